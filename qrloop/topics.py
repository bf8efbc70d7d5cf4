"""The online loop's Kafka topics, created through the admin client with the partition counts in settings.

The broker has auto-creation off on purpose: a topic created by a typo would silently get the default layout,
and the join in the aggregator depends on query events and interactions having the *same* partition count.
Every process that produces or consumes calls :func:`ensure_topics` at start; it is idempotent and safe to
run concurrently (the broker decides who creates, everyone then checks the layout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import TopicAlreadyExistsError

from qrloop.settings import Settings


class TopicLayoutError(RuntimeError):
    """An existing topic's partition count differs from the configured one."""


def declared_topics(settings: Settings) -> dict[str, int]:
    """Every topic of the loop → its partition count."""
    t = settings.topics
    return {
        t.query_events: t.partitions,
        t.interactions: t.partitions,  # must equal query_events: co-partitioned join
        t.preference_pairs: t.pair_partitions,
        t.policy_versions: 1,  # announcements are totally ordered
        t.dead_letter: 1,  # low volume, read by people in arrival order
        t.query_outcomes: 1,  # one per query; the canary job reads them in order
    }


def ensure_topics(
    settings_or_bootstrap: Settings | str,
    topics: Mapping[str, int] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create missing topics, check existing ones, wait until metadata shows them all with leaders.

    ``settings_or_bootstrap``: the settings (bootstrap servers, client id, replication factor, and the
    declared topics when ``topics`` is None) or just a bootstrap address, in which case ``topics`` is
    required. Returns the topic names. Raises :class:`TopicLayoutError` when a topic exists with another
    partition count.
    """
    if isinstance(settings_or_bootstrap, Settings):
        settings = settings_or_bootstrap
        bootstrap, client_id = settings.kafka.bootstrap_servers, f"{settings.kafka.client_id}-admin"
        replication = settings.topics.replication_factor
        wanted = dict(topics) if topics is not None else declared_topics(settings)
    else:
        if topics is None:
            raise ValueError("ensure_topics(bootstrap, topics): name the topics when no settings are given")
        bootstrap, client_id, replication, wanted = settings_or_bootstrap, "qrloop-admin", 1, dict(topics)
    for name, partitions in wanted.items():
        if partitions < 1:
            raise ValueError(f"topic {name}: partition count must be ≥ 1, got {partitions}")

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, request_timeout_ms=10_000)
    try:
        existing = _layout(admin, list(wanted))
        _check_layout(wanted, existing)
        missing = [n for n in wanted if n not in existing]
        if missing:
            _create(admin, {n: wanted[n] for n in missing}, replication)
        _wait_until_ready(admin, wanted, timeout_s)
        return list(wanted)
    finally:
        admin.close()


def grow_topics(settings: Settings, timeout_s: float = 30.0) -> dict[str, tuple[int, int]]:
    """Raise existing topics to the partition counts in settings; returns ``{topic: (before, after)}``.

    Kafka can add partitions but never remove them, so a count below the existing one is an error. Adding
    partitions changes which partition a key hashes to *for new records*: a query whose event was written
    before the change and whose interactions after it would be split across partitions and never joined.
    Grow while the rewriter is stopped and the aggregator has closed its windows (``qrloop status`` shows no
    lag), and grow query events and interactions in the same call (this does both, from one settings
    object). Learners and aggregators pick the new partitions up on restart (the learner reads a new
    partition from its beginning: no stored offset).
    """
    wanted = declared_topics(settings)
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        client_id=f"{settings.kafka.client_id}-admin",
        request_timeout_ms=10_000,
    )
    try:
        existing = {name: len(leaders) for name, leaders in _layout(admin, list(wanted)).items()}
        shrink = {n: (existing[n], p) for n, p in wanted.items() if n in existing and p < existing[n]}
        if shrink:
            raise TopicLayoutError(f"Kafka cannot remove partitions; settings ask for fewer: {shrink}")
        grow = {n: p for n, p in wanted.items() if n in existing and p > existing[n]}
        if grow:
            admin.create_partitions({n: NewPartitions(total_count=p) for n, p in grow.items()})
        _wait_until_ready(admin, {n: wanted[n] for n in existing}, timeout_s)
        return {n: (existing[n], p) for n, p in grow.items()}
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, topics: dict[str, int], replication: int) -> None:
    new = [NewTopic(n, num_partitions=p, replication_factor=replication) for n, p in topics.items()]
    # Another process may win the race for one of them. The broker still creates the rest of the batch
    # (kafka-python raises on the first per-topic error), and the layout is checked while waiting.
    with contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topics(new)


def _wait_until_ready(admin: KafkaAdminClient, wanted: dict[str, int], timeout_s: float) -> None:
    """Creation is asynchronous: poll metadata until every partition of every topic has a leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        existing = _layout(admin, list(wanted))
        # A racer may have created a topic with another count: say so now rather than time out.
        _check_layout(wanted, existing)
        if all(n in existing and all(leader >= 0 for leader in existing[n]) for n in wanted):
            return
        if time.monotonic() > deadline:
            waiting = sorted(n for n in wanted if n not in existing or min(existing[n], default=-1) < 0)
            raise TimeoutError(f"topics not ready (no metadata or no leader) after {timeout_s} s: {waiting}")
        time.sleep(0.2)


def _check_layout(wanted: Mapping[str, int], existing: Mapping[str, list[int]]) -> None:
    for name, partitions in wanted.items():
        have = len(existing.get(name, [])) or partitions  # a topic not created yet has no layout to check
        if have != partitions:
            raise TopicLayoutError(
                f"topic {name} has {have} partitions, settings say {partitions}; "
                "delete the topic or change the settings"
            )


def _layout(admin: KafkaAdminClient, names: list[str]) -> dict[str, list[int]]:
    """Topic → the leader id of each partition (-1: none yet), for the topics among ``names`` that exist."""
    present = set(admin.list_topics())
    query = [n for n in names if n in present]
    if not query:
        return {}
    return {
        t["topic"]: [p["leader"] for p in t["partitions"]]
        for t in admin.describe_topics(query)
        if not t.get("error_code")
    }
