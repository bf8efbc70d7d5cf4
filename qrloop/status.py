"""One summary of the loop for operators: what ``qrloop status`` prints and ``qrloop ui``'s page shows.

Gathered read-only from the two places the loop keeps its state:

- the **policy store**: the versions and their lineage, what each alias points at and how it moved (the
  audit log), the canary's state and verdicts (``canary_job.summary``, the same reading ``qrloop canary
  status`` makes; verdict names are passed through as they are, so a new outcome needs no change here);
- the **broker**, through the admin client and a group-less consumer (nothing is committed, no group is
  joined): the lag of the learner's and the aggregator's consumer groups per partition (end offset − committed
  offset), the dead letters (how many, and the reasons of the latest) and the reward each serving version
  earned (the latest ``query-outcomes``, grouped by the version that served the query).

A broker that does not answer does not hide the store's part: the summary says what could not be read in
``errors``. Everything is plain data (``Summary.as_dict()`` is what ``--json`` prints).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from sqlalchemy.engine import make_url

from policy_store import PolicyStore
from policy_store.entities import AuditEntry, PolicyVersion
from qrloop.canary_job import summary as canary_summary
from qrloop.events import DeadLetter, QueryOutcome, SchemaError, decode
from qrloop.settings import Settings

log = logging.getLogger("qrloop.status")
ALIAS_MOVES = ("set_alias", "rollback")
KAFKA_TIMEOUT_MS = 5_000


@dataclass(frozen=True)
class VersionView:
    id: int
    parent_id: int | None
    created_at: datetime
    status: str
    train_steps: int
    loss: float | None
    margin: float | None
    aliases: list[str]
    learner: str | None


@dataclass(frozen=True)
class AliasView:
    alias: str
    version_id: int
    updated_at: datetime
    moves: int


@dataclass(frozen=True)
class AliasMove:
    at: datetime
    action: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing on this partition yet
    end: int
    lag: int


@dataclass(frozen=True)
class VersionReward:
    version: int | None  # None: queries served before any version was known
    queries: int
    mean_reward: float
    mean_relevance: float


@dataclass
class DeadLetters:
    total: int = 0  # every letter the topic holds (end − beginning offsets)
    by_reason: dict[str, int] = field(default_factory=dict)  # of the latest ones read
    latest: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Summary:
    generated_at: datetime
    database: str
    versions: list[VersionView]
    aliases: list[AliasView]
    alias_moves: list[AliasMove]
    canary: dict[str, Any]
    lag: list[PartitionLag] = field(default_factory=list)
    rewards: list[VersionReward] = field(default_factory=list)
    dead_letters: DeadLetters = field(default_factory=DeadLetters)
    errors: list[str] = field(default_factory=list)

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.lag)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_lag"] = self.total_lag
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ the store


def _version_view(version: PolicyVersion, held: dict[int, list[str]]) -> VersionView:
    metrics = version.metrics
    learner = version.tags.get("learner")
    return VersionView(
        id=version.id,
        parent_id=version.parent_id,
        created_at=version.created_at,
        status=version.status,
        train_steps=version.train_steps,
        loss=metrics.get("loss"),
        margin=metrics.get("margin"),
        aliases=sorted(held.get(version.id, [])),
        learner=None if learner is None else str(learner),
    )


def _move(entry: AuditEntry) -> AliasMove:
    return AliasMove(
        at=entry.at,
        action=entry.action,
        alias=entry.alias or "",
        from_version=entry.from_version,
        to_version=entry.to_version,
        actor=entry.actor,
        reason=entry.reason,
    )


def store_part(store: PolicyStore, settings: Settings, versions: int = 50, moves: int = 30) -> Summary:
    """Versions (newest ``versions``), aliases, the latest ``moves`` alias moves and the canary's state."""
    records = store.aliases()
    held: dict[int, list[str]] = {}
    for record in records.values():
        held.setdefault(record.version_id, []).append(record.alias)
    alias_moves = [_move(e) for e in store.audit(limit=moves * 4) if e.action in ALIAS_MOVES][:moves]
    return Summary(
        generated_at=datetime.now(UTC),
        database=make_url(settings.db_url).render_as_string(hide_password=True),
        versions=[_version_view(v, held) for v in store.list(limit=versions)],
        aliases=[AliasView(r.alias, r.version_id, r.updated_at, r.generation) for r in records.values()],
        alias_moves=alias_moves,
        canary=canary_summary(store, settings.canary, limit=10),
    )


def unreadable_store(settings: Settings, error: Exception) -> Summary:
    """The summary of a store that cannot be read (not migrated yet, the server down): empty, saying why."""
    return Summary(
        generated_at=datetime.now(UTC),
        database=make_url(settings.db_url).render_as_string(hide_password=True),
        versions=[],
        aliases=[],
        alias_moves=[],
        canary={"production": None, "canary": None, "live": False, "share": 0.0, "verdicts": []},
        errors=[f"policy store: {type(error).__name__}: {error}".splitlines()[0]],
    )


# ----------------------------------------------------------------------------------------------- the broker


def watched_groups(settings: Settings) -> list[str]:
    """The consumer groups whose lag matters: the learner's (pairs) and the aggregator's (Faust app id)."""
    return [f"{settings.dpo.learner_name}-learner", settings.streams.app_id]


def group_lag(admin: KafkaAdminClient, consumer: KafkaConsumer, group: str) -> list[PartitionLag]:
    """End offset − committed offset for every partition the group has committed on."""
    committed = {tp: meta.offset for tp, meta in admin.list_consumer_group_offsets(group).items()}
    if not committed:
        return []
    ends = consumer.end_offsets(list(committed))
    return [
        PartitionLag(
            group=group,
            topic=tp.topic,
            partition=tp.partition,
            committed=None if offset < 0 else offset,
            end=ends[tp],
            lag=ends[tp] - max(offset, 0),
        )
        for tp, offset in sorted(committed.items())
    ]


def tail(consumer: KafkaConsumer, topic: str, last: int, timeout_s: float = 5.0) -> tuple[int, list[bytes]]:
    """(how many records the topic holds, the values of up to ``last`` newest records per partition)."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return 0, []
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    begins, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, max(begins[tp], ends[tp] - last))
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            values.extend(r.value for r in records if r.value is not None)
    return sum(ends[tp] - begins[tp] for tp in tps), values


def rewards_by_version(raw: list[bytes]) -> list[VersionReward]:
    """Mean reward and relevance of the queries each version served (one outcome per query and arm)."""
    by_version: dict[int | None, list[QueryOutcome]] = {}
    for value in raw:
        try:
            outcome = decode(QueryOutcome, value)
        except SchemaError:
            continue  # the aggregator dead-letters bad input; a summary only skips it
        by_version.setdefault(outcome.policy_version, []).append(outcome)
    return [
        VersionReward(
            version=version,
            queries=len(items),
            mean_reward=sum(o.reward for o in items) / len(items),
            mean_relevance=sum(o.relevance for o in items) / len(items),
        )
        for version, items in sorted(by_version.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
    ]


def dead_letter_part(total: int, raw: list[bytes], latest: int = 10) -> DeadLetters:
    letters = []
    for value in raw:
        try:
            letters.append(decode(DeadLetter, value))
        except SchemaError:
            continue
    return DeadLetters(
        total=total,
        by_reason=dict(Counter(letter.reason for letter in letters).most_common()),
        latest=[
            {
                "at": letter.at,
                "source_topic": letter.source_topic,
                "partition": letter.partition,
                "offset": letter.offset,
                "reason": letter.reason,
                "error": letter.error[:200],
            }
            for letter in letters[-latest:][::-1]
        ],
    )


def broker_part(summary: Summary, settings: Settings, outcomes: int = 2_000, letters: int = 200) -> None:
    """Add lag, rewards and dead letters to ``summary``; a broker problem is recorded in ``errors``."""
    bootstrap = settings.kafka.bootstrap_servers
    client_id = f"{settings.kafka.client_id}-status"
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id=client_id, request_timeout_ms=KAFKA_TIMEOUT_MS
        )
    except (KafkaError, OSError) as exc:
        summary.errors.append(f"broker {bootstrap}: {type(exc).__name__}: {exc}")
        return
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=KAFKA_TIMEOUT_MS + 1_000,
    )
    try:
        for group in watched_groups(settings):
            summary.lag.extend(group_lag(admin, consumer, group))
        _, raw = tail(consumer, settings.topics.query_outcomes, outcomes)
        summary.rewards = rewards_by_version(raw)
        total, raw = tail(consumer, settings.topics.dead_letter, letters)
        summary.dead_letters = dead_letter_part(total, raw)
    except (KafkaError, OSError) as exc:
        summary.errors.append(f"broker {bootstrap}: {type(exc).__name__}: {exc}")
    finally:
        consumer.close()
        admin.close()


def gather(store: PolicyStore, settings: Settings, *, broker: bool = True) -> Summary:
    """The whole summary: the store's part, then (``broker``) the broker's."""
    summary = store_part(store, settings)
    if broker:
        broker_part(summary, settings)
    return summary
