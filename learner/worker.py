"""The learner process, top to bottom like nanoGPT's train.py:

    resume → consume pairs → (16 new ones) → one DPO step → publish weights + offsets + pair ids in one
    transaction → commit offsets to Kafka → move the alias → announce → repeat.

Exactly-once training over an at-least-once stream: the aggregator may re-emit a pair (same deterministic
``pair_id``) and Kafka may redeliver after a crash, so the learner

- keeps its consumed offsets *in the database*, in the same transaction as the version that includes them,
  and on restart seeks to the offsets stored with its latest version (Kafka's committed offsets are written
  afterwards, for lag monitoring only);
- records every trained pair id in that transaction too (``learner.ledger``) and skips ids already trained.

A crash anywhere (between steps, in the middle of one, in the middle of a publish) therefore loses nothing and
trains nothing twice: what was not committed is redone from the stored offsets.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learner.lease import LearnerLease
from policy_store import LeaseLostError, PolicyStore
from qrloop import metrics
from qrloop.events import DeadLetter, PolicyAnnouncement, PreferencePair, SchemaError, decode, encode
from qrloop.settings import Settings

log = logging.getLogger("qrloop.learner")
# Loads the lineage's weights: DPOLearnerCore.from_versions, or learner.distributed's for data parallelism.
CoreFactory = Callable[..., Any]
LEARNER_TAG = "learner"


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


@dataclass
class LearnerState:
    """What the learner resumes from; everything in it comes from the policy store."""

    version: int  # the version the current weights are (parent of the next publish)
    reference_version: int  # the version this run started from: DPO's reference model
    steps: int  # DPO steps in this lineage so far
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset to read
    trained: set[str] = field(default_factory=set)  # pair ids already in published weights


@dataclass
class PendingBatch:
    pairs: list[PreferencePair] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {p.pair_id for p in self.pairs}


def resume_state(store: Any, settings: Settings) -> LearnerState:
    """The latest version this learner published, or a fresh start from the alias it trains."""
    from learner.ledger import trained_pair_ids

    name = settings.dpo.learner_name
    mine = [v for v in store.list() if v.tags.get(LEARNER_TAG) == name]
    with store.read_session() as session:
        trained = trained_pair_ids(session)
    latest = max(mine, key=lambda v: v.id) if mine else None
    if latest is not None and latest.status == "rejected":
        # The canary job rolled this lineage back: start again from the alias it trains from, and keep the
        # consumed offsets and pair ids, so the pairs that produced the rejected weights are not replayed.
        start = rebase_target(store, settings, rejected=latest.id)
        return LearnerState(
            version=start.id,
            reference_version=start.id,
            steps=start.train_steps,
            offsets=dict(latest.offsets),
            trained=trained,
        )
    if latest is not None:
        return LearnerState(
            version=latest.id,
            reference_version=int(latest.tags["reference_version"]),
            steps=latest.train_steps,
            offsets=dict(latest.offsets),
            trained=trained,
        )
    start = store.resolve(settings.dpo.start_alias)
    return LearnerState(
        version=start.id, reference_version=start.id, steps=start.train_steps, trained=trained
    )


def rebase_target(store: Any, settings: Settings, *, rejected: int) -> Any:
    """The version a learner restarts from after the canary job rejected ``rejected``: the start alias's."""
    start = store.resolve(settings.dpo.start_alias)
    alias = settings.dpo.start_alias
    log.warning("version %d was rejected; rebasing on %s (version %d)", rejected, alias, start.id)
    return start


class Learner:
    """Owns the consumer loop; the DPO arithmetic is ``learner.dpo``'s, the storage the policy store's."""

    def __init__(
        self, settings: Settings, store: Any, core: Any, state: LearnerState, consumer: Any, producer: Any
    ):
        self.settings = settings
        self.store = store
        self.core = core
        self.state = state
        self.consumer = consumer
        self.producer = producer
        self.pending = PendingBatch()
        self.next_offsets = dict(state.offsets)
        self.stop_requested = threading.Event()
        self.on_publish: Callable[[int], None] | None = None
        self._unpublished: list[str] = []  # trained in steps not yet published (publish_every > 1)
        # Held for the whole publish (weights, DB transaction, offsets, alias, announcements): a stop past its
        # deadline may abandon a DPO step, never a publish half-announced.
        self.publishing = threading.Lock()
        self.finished = threading.Event()
        self._reward_avg: dict[str, float] = {}
        self.make_core: CoreFactory | None = None  # None: DPOLearnerCore.from_versions
        # The lineage's lease (learner.lease): fences every publish. None only for a learner driven by hand.
        self.lease: LearnerLease | None = None

    # -- consuming ------------------------------------------------------------------------------------------

    def _dead_letter(self, record: Any, reason: str, error: str) -> None:
        letter = DeadLetter.of(record.topic, record.partition, record.offset, reason, error, record.value)
        metrics.DEAD_LETTERS.labels(reason).inc()
        self.producer.send(self.settings.topics.dead_letter, key=record.key, value=encode(letter))

    def take(self, record: Any) -> None:
        """One record from the pair topic: queue it for training, or skip it with a reason."""
        self.next_offsets[offset_key(record.topic, record.partition)] = record.offset + 1
        try:
            pair = decode(PreferencePair, record.value)
        except SchemaError as exc:
            self._dead_letter(record, exc.reason, str(exc))
            return
        if pair.pair_id in self.state.trained or pair.pair_id in self.pending.ids:
            log.info("skipping pair %s: already trained", pair.pair_id)
            return
        self.pending.pairs.append(pair)
        # Exponential moving average (about the last 32 pairs) of the chosen reward, per arm.
        previous = self._reward_avg.get(pair.arm, pair.chosen_reward)
        self._reward_avg[pair.arm] = previous + (pair.chosen_reward - previous) / 32
        metrics.REWARD_AVG.labels(pair.arm).set(self._reward_avg[pair.arm])

    # -- training and publishing ----------------------------------------------------------------------------

    def step(self) -> Any:
        batch = self.pending.pairs[: self.settings.dpo.batch_size]
        log.info("DPO step %d started on %d pairs", self.state.steps + 1, len(batch))
        started = time.perf_counter()
        stats = self.core.step([(p.prompt, p.chosen, p.rejected) for p in batch])
        seconds = time.perf_counter() - started
        self.state.steps += 1
        metrics.DPO_STEPS.inc()
        metrics.DPO_STEP_SECONDS.observe(seconds)
        metrics.DPO_LOSS.set(stats.loss)
        metrics.DPO_MARGIN.set(stats.margin)
        log.info(
            "DPO step %d: loss %.4f margin %.4f (%.1f s)", self.state.steps, stats.loss, stats.margin, seconds
        )
        return stats

    def publish(self, trained_ids: list[str], stats: Any) -> int:
        with self.publishing:
            return self._publish(trained_ids, stats)

    def _publish(self, trained_ids: list[str], stats: Any) -> int:
        settings = self.settings
        with tempfile.TemporaryDirectory(dir=settings.cache_dir) as tmp:
            self.core.save(Path(tmp))
            version = self.store.publish(
                tmp,
                parent=self.state.version,
                base_model=self.core.base_model,
                train_steps=self.state.steps,
                offsets=self.next_offsets,
                metrics=stats.as_dict(),
                tags={
                    LEARNER_TAG: settings.dpo.learner_name,
                    "reference_version": self.state.reference_version,
                },
                actor="learner",
                reason=f"DPO step {self.state.steps}",
                extra_sql=lambda session, version_id: self._in_publish(session, version_id, trained_ids),
            )
        self.state.version = version.id
        self.state.offsets = dict(self.next_offsets)
        self.state.trained.update(trained_ids)
        self._commit_kafka_offsets()
        self._announce(
            PolicyAnnouncement(kind="version_published", version=version.id, details=stats.as_dict())
        )
        previous = self._move_alias(version.id)
        self._announce(
            PolicyAnnouncement(
                kind="alias_moved", version=version.id, alias=settings.dpo.alias, previous_version=previous
            )
        )
        if self.on_publish:
            self.on_publish(version.id)
        return version.id

    def _in_publish(self, session: Any, version_id: int, trained_ids: list[str]) -> None:
        """Inside the publish transaction: the lease's epoch check first (a stale learner's publish is
        refused by the database), then the ledger rows."""
        from learner.ledger import record_pairs

        if self.lease is not None:
            self.lease.fence(session)
        record_pairs(session, version_id, trained_ids)

    def _commit_kafka_offsets(self) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        offsets = {}
        for key, offset in self.next_offsets.items():
            topic, partition = key.rsplit(":", 1)
            offsets[TopicPartition(topic, int(partition))] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)

    def _move_alias(self, version_id: int) -> int | None:
        alias = self.settings.dpo.alias
        current = self.store.aliases().get(alias)
        # Fenced too: a learner taken over right after its publish must not move the alias back over the
        # new holder's later versions.
        fence = self.lease.fence if self.lease is not None else None
        self.store.set_alias(
            alias, version_id, reason=f"learner published {version_id}", actor="learner", fence=fence
        )
        metrics.ALIAS_VERSION.labels(alias).set(version_id)
        return current.version_id if current else None

    def _announce(self, note: PolicyAnnouncement) -> None:
        self.producer.send(
            self.settings.topics.policy_versions, key=str(note.version).encode(), value=encode(note)
        )
        self.producer.flush()

    # -- the loop -------------------------------------------------------------------------------------------

    def run_once(self, timeout_ms: int = 500) -> int | None:
        """Poll once; train and publish if a batch is full. Returns the published version, if any."""
        need = self.settings.dpo.batch_size - len(self.pending.pairs)
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=max(need, 1)).values():
            for record in records:
                self.take(record)
        self._update_lag()
        if len(self.pending.pairs) < self.settings.dpo.batch_size:
            return None
        self._rebase_if_rejected()
        batch_ids = [p.pair_id for p in self.pending.pairs[: self.settings.dpo.batch_size]]
        stats = self.step()
        self.pending.pairs = self.pending.pairs[self.settings.dpo.batch_size :]
        self._unpublished.extend(batch_ids)
        if self.state.steps % self.settings.dpo.publish_every != 0:
            return None
        version = self.publish(self._unpublished, stats)
        self._unpublished = []
        return version

    def _rebase_if_rejected(self) -> None:
        """Before a step: when the weights being trained belong to a version the canary job rejected, load
        the start alias's version instead (a new reference and optimizer too), rather than keep improving a
        policy that shoppers already measured as worse. One database read per step."""
        from learner.dpo import DPOLearnerCore

        if self.store.get(self.state.version).status != "rejected":
            return
        start = rebase_target(self.store, self.settings, rejected=self.state.version)
        self._unpublished = []  # steps on the rejected weights are discarded with them
        make_core = self.make_core or DPOLearnerCore.from_versions
        self.core = make_core(self.settings, self.store, policy_version=start.id, reference_version=start.id)
        self.state.version = self.state.reference_version = start.id
        self.state.steps = start.train_steps

    def _update_lag(self) -> None:
        """Per partition of the pair topic, records not yet consumed (end offset − position), every poll.

        The end offset is the high watermark of the partition's last fetch response, which kafka-python
        keeps, so a poll costs no extra request; only before the first fetch answers is it asked for.
        """
        assigned = sorted(self.consumer.assignment())
        ends: dict[Any, int | None] = {tp: self.consumer.highwater(tp) for tp in assigned}
        unknown = [tp for tp, end in ends.items() if end is None]
        if unknown:
            ends.update(self.consumer.end_offsets(unknown))
        for tp in assigned:
            lag = max(0, int(ends[tp] or 0) - self.consumer.position(tp))
            metrics.CONSUMER_LAG.labels("learner", tp.topic, str(tp.partition)).set(lag)

    def lease_lost(self) -> bool:
        return self.lease is not None and self.lease.lost.is_set()

    def run(self) -> None:
        """Until a stop is requested or the lease is lost (then the caller goes back to standby)."""
        while not self.stop_requested.is_set() and not self.lease_lost():
            try:
                self.run_once()
            except LeaseLostError as exc:
                log.warning("publish refused, another learner took over: %s", exc)
        log.info("learner stopping after step %d (version %d)", self.state.steps, self.state.version)
        self.finished.set()

    # -- signals --------------------------------------------------------------------------------------------

    def request_stop(self, deadline_s: float) -> None:
        """SIGTERM: stop after the step in progress; past ``deadline_s`` abandon it and exit 0.

        Abandoning is safe because nothing of a step is visible before its publish, whose weights, offsets
        and pair ids are one transaction: the restarted learner seeks to the stored offsets and redoes it.
        A publish in progress is waited for (``self.publishing``), so the alias and announcements follow.
        """
        if self.stop_requested.is_set():
            return
        self.stop_requested.set()
        log.info("stop requested: finishing the step in progress (deadline %.0f s)", deadline_s)

        def watchdog() -> None:
            if self.finished.wait(deadline_s):
                return
            with self.publishing:
                log.warning(
                    "stop deadline of %.0f s passed: abandoning the step in progress; nothing of it was "
                    "committed, the next start redoes it from version %d's offsets",
                    deadline_s,
                    self.state.version,
                )
                logging.shutdown()
                os._exit(0)

        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()

    def reload(self, fresh: Settings) -> None:
        """SIGHUP: apply the settings that are safe to change between steps (see ``RELOADABLE``)."""
        from qrloop import logs

        logs.set_level(fresh.logging.level)
        changes = {
            k: getattr(fresh.dpo, k)
            for k in RELOADABLE
            if getattr(fresh.dpo, k) != getattr(self.settings.dpo, k)
        }
        self.settings.dpo = self.settings.dpo.model_copy(update=changes)
        config = getattr(self.core, "config", None)
        for name, value in changes.items():
            if config is not None and hasattr(config, name):
                setattr(config, name, value)
            if name == "learning_rate":
                for group in self.core.optimizer.param_groups:
                    group["lr"] = value
        log.info("settings reloaded: log level %s, %s", fresh.logging.level, changes or "no DPO change")


# Safe to change in a running learner: they act from the next step on and change nothing already published.
# Topics, database, lineage name, batch size and aliases are not: they change what the stored offsets mean.
RELOADABLE = ("beta", "learning_rate", "max_grad_norm", "publish_every", "stop_deadline_s")


def seek_to_stored_offsets(consumer: Any, settings: Settings, state: LearnerState) -> None:
    """Assign every partition of the pair topic and seek to where the latest version's offsets say."""
    from kafka import TopicPartition

    topic = settings.topics.preference_pairs
    partitions = consumer.partitions_for_topic(topic) or set()
    if not partitions:
        raise RuntimeError(f"topic {topic} does not exist; create the topics first (qrloop topics create)")
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    for tp in assigned:
        stored = state.offsets.get(offset_key(topic, tp.partition))
        if stored is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, stored)


def build(
    settings: Settings, lease: LearnerLease | None = None, make_core: CoreFactory | None = None
) -> Learner:
    """A learner resumed from the store. ``lease``: already acquired, fences its publishes (``run`` passes
    one; tests that drive ``run_once`` by hand may leave it out). ``make_core``: how weights are loaded
    (default ``DPOLearnerCore.from_versions``; ``learner.distributed`` passes its data-parallel one)."""
    from kafka import KafkaConsumer, KafkaProducer

    from learner.dpo import DPOLearnerCore

    store = PolicyStore.from_settings(settings)
    state = resume_state(store, settings)
    core = (make_core or DPOLearnerCore.from_versions)(
        settings, store, policy_version=state.version, reference_version=state.reference_version
    )
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"{settings.dpo.learner_name}-learner",
        enable_auto_commit=False,  # offsets live in the database with the version; see the module docstring
        auto_offset_reset="earliest",
        client_id=f"{settings.kafka.client_id}-learner",
    )
    seek_to_stored_offsets(consumer, settings, state)
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True, acks="all"
    )
    learner = Learner(settings, store, core, state, consumer, producer)
    learner.lease = lease
    learner.make_core = make_core
    return learner


def run(make_core: CoreFactory | None = None) -> None:
    """``qrloop learn``: the long-running learner, its probes and metrics on ``dpo.metrics_port``.

    SIGTERM/SIGINT: stop after the step in progress, or abandon it past ``dpo.stop_deadline_s`` (exit 0
    either way); SIGHUP: reload the log level and the ``RELOADABLE`` DPO settings.
    """
    from qrloop import health
    from qrloop.settings import get_settings

    settings = get_settings()
    loaded: dict[str, Learner] = {}

    def model_check() -> str:
        if "learner" not in loaded:
            raise RuntimeError("standby for the lineage's lease, or loading the models")
        return f"version {loaded['learner'].state.version} loaded"

    health.serve(
        settings.dpo.metrics_port,
        {
            "broker": health.kafka_check(settings.kafka.bootstrap_servers),
            "database": health.database_check(settings.db_url),
            "model": model_check,
        },
        role="learner",
    )
    lease = LearnerLease.for_settings(settings, PolicyStore.from_settings(settings))
    while True:
        # Until the loop runs there is nothing to finish: a stop while waiting or loading just exits.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sys.exit(0))
        lease.wait_until_acquired(threading.Event())
        if not train_while_holding(settings, lease, loaded, make_core):
            lease.release()
            return
        loaded.clear()


def train_while_holding(
    settings: Settings, lease: LearnerLease, loaded: dict[str, Learner], make_core: CoreFactory | None
) -> bool:
    """Resume and train until a stop (False) or until the lease is lost to another learner (True)."""
    learner = loaded["learner"] = build(settings, lease, make_core)
    metrics.ALIAS_VERSION.labels(settings.dpo.alias).set(learner.state.version)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: learner.request_stop(learner.settings.dpo.stop_deadline_s))
    signal.signal(signal.SIGHUP, lambda *_: learner.reload(Settings()))
    log.info(
        "learner resuming at version %d (reference %d, step %d)",
        learner.state.version,
        learner.state.reference_version,
        learner.state.steps,
    )
    learner.run()
    learner.consumer.close()
    learner.producer.close()
    if learner.lease_lost():
        log.warning("lease lost at version %d: back to standby", learner.state.version)
        return True
    return False
