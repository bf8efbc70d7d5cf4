"""The online loop's Kafka topics, created through the admin client with the partition counts in settings.

The broker has auto-creation off on purpose: a topic created by a typo would silently get the default layout,
and the join in the aggregator depends on query events and interactions having the *same* partition count.
"""

from __future__ import annotations

import contextlib
import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from qrloop.settings import Settings


class TopicLayoutError(RuntimeError):
    """An existing topic's partition count differs from the configured one."""


def declared_topics(settings: Settings) -> dict[str, int]:
    t = settings.topics
    return {
        t.query_events: t.partitions,
        t.interactions: t.partitions,
        t.preference_pairs: t.pair_partitions,
        t.policy_versions: 1,  # announcements are totally ordered
        t.dead_letter: 1,
    }


def ensure_topics(
    settings: Settings, topics: dict[str, int] | None = None, timeout_s: float = 30.0
) -> list[str]:
    """Create missing topics, check existing ones, wait until metadata shows them all. Idempotent."""
    wanted = topics if topics is not None else declared_topics(settings)
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers, client_id=f"{settings.kafka.client_id}-admin"
    )
    try:
        existing = _partition_counts(admin, list(wanted))
        for name, partitions in wanted.items():
            if name in existing and existing[name] != partitions:
                raise TopicLayoutError(
                    f"topic {name} has {existing[name]} partitions, settings say {partitions}; "
                    "delete it or change the settings"
                )
        missing = [
            NewTopic(name, num_partitions=partitions, replication_factor=settings.topics.replication_factor)
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            # Created concurrently by another process is fine: the layout is checked below.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
        deadline = time.monotonic() + timeout_s
        while True:
            existing = _partition_counts(admin, list(wanted))
            if all(existing.get(name) == n for name, n in wanted.items()):
                return list(wanted)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"topics not visible after {timeout_s} s: {sorted(set(wanted) - set(existing))}"
                )
            time.sleep(0.2)
    finally:
        admin.close()


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    present = set(admin.list_topics())
    query = [n for n in names if n in present]
    if not query:
        return {}
    return {t["topic"]: len(t["partitions"]) for t in admin.describe_topics(query) if not t.get("error_code")}
