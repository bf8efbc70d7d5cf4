"""The online loop's Kafka topics, created through the admin client with the partition counts in settings.

The broker has auto-creation off on purpose: a topic created by a typo would silently get the default layout,
and the join in the aggregator depends on query events and interactions having the *same* partition count.
Every process that produces or consumes calls :func:`ensure_topics` at start; it is idempotent and safe to
run concurrently (the broker decides who creates, everyone then checks the layout).

The roles' producers come from :func:`make_producer` and a record that cannot be processed goes aside with
:func:`send_dead_letter`, so every role produces and dead-letters the same way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata

from qrloop import metrics
from qrloop.events import DeadLetter, encode
from qrloop.settings import Settings

log = logging.getLogger(__name__)


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


def report_out_of_range(role: str, topic: str, partition: int, offset: int, start: int, end: int) -> None:
    """Say and count that a stored position ``offset`` is outside ``[start, end]``.

    Below the log start: retention (or ``delete-records``) removed ``[offset, start)`` before they were read.
    Past the end: the topic was recreated or the broker lost data; nothing is known lost, but everything
    there now is read again (pairs are recognised downstream by their ids). The caller reads on from
    ``start``: one rule for every consumer, so no role resets silently.
    """
    lost = start - offset if offset < start else 0
    metrics.OFFSETS_OUT_OF_RANGE.labels(role, topic, str(partition)).inc()
    metrics.RECORDS_LOST.labels(role, topic, str(partition)).inc(lost)
    if offset < start:
        log.error(
            "%s[%d]: records %d..%d (%d) were deleted before they were read; reading on from %d",
            topic,
            partition,
            offset,
            start - 1,
            lost,
            start,
        )
    else:
        log.error(
            "%s[%d]: stored offset %d is past the end %d (topic recreated or data lost); reading from %d",
            topic,
            partition,
            offset,
            end,
            start,
        )


def make_producer(settings: Settings, **config: Any) -> KafkaProducer:
    """A producer to the configured broker, idempotent with acks=all: a retried send is neither lost nor
    doubled, and the records of one partition are stored in send order. ``config`` adds to or overrides the
    kafka-python settings (``linger_ms``, ...)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "enable_idempotence": True,
        "acks": "all",
    }
    return KafkaProducer(**{**options, **config})


class Consumed(Protocol):
    """What a dead letter needs of a consumed record (a kafka-python ``ConsumerRecord``, a Faust message)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def dead_letter(record: Consumed, reason: str, error: str) -> DeadLetter:
    """The letter for a record that cannot be processed (its original bytes and where it came from), counted
    by reason in ``qrloop_dead_letters_total``."""
    metrics.DEAD_LETTERS.labels(reason).inc()
    return DeadLetter.of(record.topic, record.partition, record.offset, reason, error, record.value)


def send_dead_letter(
    producer: KafkaProducer, settings: Settings, record: Consumed, reason: str, error: str
) -> FutureRecordMetadata:
    """Set ``record`` aside on the dead-letter topic, under its own key, so the role goes on with the next;
    the send's future, for a caller that checks delivery (replay)."""
    letter = dead_letter(record, reason, error)
    return producer.send(settings.topics.dead_letter, key=record.key, value=encode(letter))


# --------------------------------------------------------------------------------- the topics of demo runs


def run_consumer_groups(settings: Settings, run_id: str) -> list[str]:
    """The consumer groups a demo run's roles join (``qrloop.cli.demo.run_settings`` names them)."""
    return [f"{settings.streams.app_id}-{run_id}", f"demo-{run_id}-learner"]


def demo_runs(settings: Settings, names: Iterable[str]) -> dict[str, list[str]]:
    """Run id → the topics of that demo run among ``names``.

    ``settings`` are the base settings (not a run's): a run's topics are the declared ones suffixed with
    ``.<run id>``, plus the Faust application's own topics (changelogs, the leader topic), which Faust
    names ``<streams.app_id>-<run id>-...``.
    """
    names = sorted(names)
    runs: dict[str, list[str]] = {}
    for name in names:
        for base in declared_topics(settings):
            if name.startswith(base + ".") and len(name) > len(base) + 1:
                runs.setdefault(name[len(base) + 1 :], []).append(name)
    for name in names:
        for run_id, topics in runs.items():
            if name.startswith(f"{settings.streams.app_id}-{run_id}-"):
                topics.append(name)
    return runs


def active_groups(admin: KafkaAdminClient, groups: list[str]) -> list[str]:
    """The groups among ``groups`` with members now (a group that never existed is 'Dead')."""
    return [g.group for g in admin.describe_consumer_groups(groups) if g.state not in ("Empty", "Dead")]


def delete_run(admin: KafkaAdminClient, settings: Settings, run_id: str, topics: list[str]) -> None:
    """Delete a finished run's topics and its consumer groups' committed offsets."""
    if topics:
        admin.delete_topics(topics, timeout_ms=30_000)
    for group in run_consumer_groups(settings, run_id):
        # A group that never committed does not exist; nothing to delete then.
        with contextlib.suppress(KafkaError):
            admin.delete_consumer_groups([group])


@dataclass(frozen=True)
class RunCleanup:
    run_id: str
    topics: list[str]
    deleted: bool
    why: str


def seconds_since_written(run_dir: Path) -> float | None:
    """How long ago a file in a demo run's directory (its logs, its store) last changed; None: no files."""
    times = [p.stat().st_mtime for p in run_dir.glob("*") if p.is_file()] if run_dir.is_dir() else []
    return time.time() - max(times) if times else None


def clean_runs(
    settings: Settings, dry_run: bool = False, keep: Iterable[str] = (), min_idle_s: float = 300.0
) -> list[RunCleanup]:
    """Delete the topics of every demo run on the broker except those in ``keep`` and those still running:
    a consumer group of theirs has members, or their run directory was written less than ``min_idle_s``
    ago (a run starting up has topics before its roles join). Returns what was (or, ``dry_run``, would
    be) done per run."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        client_id=f"{settings.kafka.client_id}-admin",
        request_timeout_ms=30_000,
    )
    report = []
    try:
        for run_id, topics in sorted(demo_runs(settings, admin.list_topics()).items()):
            why = ""
            busy = active_groups(admin, run_consumer_groups(settings, run_id))
            idle = seconds_since_written(settings.cache_dir / "runs" / run_id)
            if run_id in keep:
                why = "kept"
            elif busy:
                why = f"running (group {busy[0]} has members)"
            elif idle is not None and idle < min_idle_s:
                why = f"running (its run directory was written {idle:.0f} s ago)"
            if why:
                report.append(RunCleanup(run_id, topics, deleted=False, why=why))
                continue
            if not dry_run:
                delete_run(admin, settings, run_id, topics)
            report.append(RunCleanup(run_id, topics, deleted=not dry_run, why="dry run" if dry_run else ""))
    finally:
        admin.close()
    return report


def delete_own_run(base: Settings, run: Settings, run_id: str) -> list[str]:
    """At the end of a demo: delete this run's topics (those of ``run``'s settings and its Faust app's)."""
    admin = KafkaAdminClient(
        bootstrap_servers=run.kafka.bootstrap_servers,
        client_id=f"{run.kafka.client_id}-admin",
        request_timeout_ms=30_000,
    )
    try:
        topics = demo_runs(base, admin.list_topics()).get(run_id, [])
        delete_run(admin, base, run_id, topics)
        return topics
    finally:
        admin.close()
