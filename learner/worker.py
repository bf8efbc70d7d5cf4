"""The learner process, top to bottom like nanoGPT's train.py:

    resume → consume pairs → (16 new ones) → one DPO step → publish weights + offsets + pair ids in one
    transaction → commit offsets to Kafka → move the alias → announce → repeat.

Exactly-once training over an at-least-once stream: the aggregator may re-emit a pair (same deterministic
``pair_id``) and Kafka may redeliver after a crash, so the learner

- keeps its consumed offsets *in the database*, in the same transaction as the version that includes them,
  and on restart seeks to the offsets stored with its latest version (Kafka's committed offsets are written
  afterwards, for lag monitoring only);
- records every step's pair ids in that transaction too (``learner.ledger``'s training records) and, before
  each step, drops the batch's ids already trained (one indexed query; nothing is kept in memory but the
  pairs of steps not yet published);
- stores AdamW's state with each version (``optimizer.safetensors``), so a restart resumes the optimizer too.

A crash anywhere (between steps, in the middle of one, in the middle of a publish) therefore loses nothing and
trains nothing twice: what was not committed is redone from the stored offsets. ``settings.fault`` names a
point where the learner SIGKILLs itself (``tests/faults`` proves each one).

A record that is not a valid pair (or is stamped too far in the future) goes to the dead-letter topic with a
reason; whatever else a record makes fail is dead-lettered too ("unprocessable"), never retried forever.
Stored offsets that fell out of the topic (retention, lost data) are reported with the lost range and counted
(``qrloop_records_lost_total``) before reading on from the earliest record still there.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata
from sqlalchemy.orm import Session

from learner.dpo import DPOLearnerCore, Pair, StepStats
from learner.lease import LearnerLease
from learner.ledger import already_trained, record_steps
from policy_store import (
    ADAPTER_BASE_TAG,
    AliasPinnedError,
    AuditEntry,
    LeaseLostError,
    PolicyStore,
    PolicyVersion,
)
from qrloop import health, logs, metrics
from qrloop.data import dataset_name
from qrloop.events import PolicyAnnouncement, PreferencePair, SchemaError, check_event_time, decode, encode
from qrloop.models import adapter_base
from qrloop.prompting import user_message
from qrloop.reload import reload_on_sighup
from qrloop.rewards import is_echo
from qrloop.runs import open_store
from qrloop.settings import FaultPoint, Settings, get_settings
from qrloop.topics import make_producer, report_out_of_range, send_dead_letter

log = logging.getLogger("qrloop.learner")
# Loads the lineage's weights: DPOLearnerCore.from_versions, or learner.distributed's for data parallelism.
CoreFactory = Callable[..., Any]
LEARNER_TAG = "learner"


def asked(pair: PreferencePair) -> str:
    """The user message the pair's rewrites were sampled for: the query, and the result words a hinted
    policy's prompt showed (DPO must score them under that prompt, not the query alone)."""
    return user_message(pair.prompt, pair.hints)


def triple(pair: PreferencePair) -> Pair:
    """What a DPO step trains on: (the user message, chosen rewrite, rejected rewrite)."""
    return (asked(pair), pair.chosen, pair.rejected)


def beats_the_echo(pair: PreferencePair) -> bool:
    """The reward implies chosen ≻ the query itself, though the echo was not served.

    Under the gain an echo earns exactly 0 (it adds nothing to the original's list), so a chosen rewrite that
    added relevant new products or engagement on them beats it. Pairs where a rewrite already is the echo
    teach that directly.
    """
    components = pair.chosen_components
    added = components.get("novelty", 0.0) > 0 or components.get("engagement", 0.0) > 0
    return added and not is_echo(pair.prompt, pair.chosen) and not is_echo(pair.prompt, pair.rejected)


def training_triples(pairs: Sequence[PreferencePair], echo_rejected: bool) -> list[Pair]:
    """What one DPO step trains on: each pair, then (with ``dpo.echo_rejected``) the echo pairs it implies."""
    triples = [triple(p) for p in pairs]
    if echo_rejected:
        triples += [(asked(p), p.chosen, p.prompt) for p in pairs if beats_the_echo(p)]
    return triples


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


@dataclass
class LearnerState:
    """What the learner resumes from; everything in it comes from the policy store."""

    version: int  # the version the current weights are (parent of the next publish)
    reference_version: int  # the version this run started from: DPO's reference model
    steps: int  # DPO steps in this lineage so far
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset to read


@dataclass
class PendingBatch:
    pairs: list[PreferencePair] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {p.pair_id for p in self.pairs}


def reference_of(start: PolicyVersion) -> int:
    """The DPO reference of a lineage that starts from ``start``: ``start`` itself, or for a LoRA version
    the full version its adapter applies to. Such a lineage trains that adapter on, against the adapter
    disabled, exactly as the lineage that published it did (a LoRA reference is always its base)."""
    return adapter_base(start) if start.kind == "lora" else start.id


def resume_state(store: PolicyStore, settings: Settings) -> LearnerState:
    """The latest version this learner published, or a fresh start from the alias it trains."""
    name = settings.dpo.learner_name
    mine = [v for v in store.list() if v.tags.get(LEARNER_TAG) == name]
    latest = max(mine, key=lambda v: v.id) if mine else None
    if latest is not None and latest.status == "rejected":
        # The canary job rolled this lineage back: start again from the alias it trains from, and keep the
        # consumed offsets and pair ids, so the pairs that produced the rejected weights are not replayed.
        start = rebase_target(store, settings, rejected=latest.id)
        return LearnerState(
            version=start.id,
            reference_version=reference_of(start),
            steps=start.train_steps,
            offsets=dict(latest.offsets),
        )
    if latest is not None:
        return LearnerState(
            version=latest.id,
            reference_version=int(latest.tags["reference_version"]),
            steps=latest.train_steps,
            offsets=dict(latest.offsets),
        )
    start = store.resolve(settings.dpo.start_alias)
    return LearnerState(version=start.id, reference_version=reference_of(start), steps=start.train_steps)


def rebase_target(store: PolicyStore, settings: Settings, *, rejected: int) -> PolicyVersion:
    """The version a learner restarts from after the canary job rejected ``rejected``: the start alias's."""
    start = store.resolve(settings.dpo.start_alias)
    alias = settings.dpo.start_alias
    log.warning("version %d was rejected; rebasing on %s (version %d)", rejected, alias, start.id)
    return start


class Learner:
    """Owns the consumer loop; the DPO arithmetic is ``learner.dpo``'s, the storage the policy store's."""

    def __init__(
        self,
        settings: Settings,
        store: PolicyStore,
        core: DPOLearnerCore,
        state: LearnerState,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
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
        # (step, pair ids) of steps not yet published (publish_every > 1): a re-sent pair among them is a
        # duplicate too, though the database does not know it yet.
        self._unpublished: list[tuple[int, list[str]]] = []
        self._fault_hits = 0
        # Held for the whole publish (weights, DB transaction, offsets, alias, announcements): a stop past its
        # deadline may abandon a DPO step, never a publish half-announced.
        self.publishing = threading.Lock()
        self.finished = threading.Event()
        self._reward_avg: dict[str, float] = {}
        self.heartbeat: health.Heartbeat | None = None  # /healthz: beaten once per poll of the loop below
        self.make_core: CoreFactory | None = None  # None: DPOLearnerCore.from_versions
        # The lineage's lease (learner.lease): fences every publish. None only for a learner driven by hand.
        self.lease: LearnerLease | None = None

    # -- consuming ------------------------------------------------------------------------------------------

    def take(self, record: ConsumerRecord) -> None:
        """One record from the pair topic: queue it for training, or skip it with a reason.

        Never raises for a record: a crash here would re-read the same record after every restart.
        """
        self.next_offsets[offset_key(record.topic, record.partition)] = record.offset + 1
        try:
            self._queue(record)
        except SchemaError as exc:
            send_dead_letter(self.producer, self.settings, record, exc.reason, str(exc))
        except Exception as exc:  # whatever else one record makes fail: dead-lettered, never retried forever
            log.exception("pair at %s[%d]@%d is unprocessable", record.topic, record.partition, record.offset)
            send_dead_letter(
                self.producer, self.settings, record, "unprocessable", f"{type(exc).__name__}: {exc}"
            )

    def _queue(self, record: ConsumerRecord) -> None:
        pair = decode(PreferencePair, record.value)
        # A pair's time is its query's; only the future is refused: a learner that was down for a week
        # must still train the week's pairs.
        check_event_time(pair.event_time, max_future_s=self.settings.event_time.max_future_s, max_age_s=None)
        if pair.pair_id in self.pending.ids or any(pair.pair_id in ids for _, ids in self._unpublished):
            log.info("skipping pair %s: already queued or trained since the last publish", pair.pair_id)
            return
        self.core.tokenize([triple(pair)])  # a pair the tokenizer refuses is dead-lettered alone, here
        self.pending.pairs.append(pair)
        # A pair's reference terms are fixed for the lineage, and the weights do not change before the step:
        # computing its reference terms and (dpo.gradient_batching) its chunk's gradient now, while the batch
        # is still gathering, takes them off the 16th pair → new version latency. The pending pairs are the
        # step's first triples in order, which fixes the chunks they are computed in; the echo triples
        # (dpo.echo_rejected) follow them, so theirs wait for the step.
        try:
            self.core.prepare_step([triple(p) for p in self.pending.pairs])
        except Exception:
            self.pending.pairs.pop()  # not queued: the step would fail on it again, after every restart
            raise
        # Exponential moving average (about the last 32 pairs) of the chosen reward, per arm.
        previous = self._reward_avg.get(pair.arm, pair.chosen_reward)
        self._reward_avg[pair.arm] = previous + (pair.chosen_reward - previous) / 32
        metrics.REWARD_AVG.labels(pair.arm).set(self._reward_avg[pair.arm])

    # -- training and publishing ----------------------------------------------------------------------------

    def step(self) -> StepStats:
        batch = self.pending.pairs[: self.settings.dpo.batch_size]
        log.info("DPO step %d started on %d pairs", self.state.steps + 1, len(batch))
        stats = self.core.step(training_triples(batch, self.settings.dpo.echo_rejected))
        self.state.steps += 1
        metrics.DPO_STEPS.inc()
        metrics.DPO_STEP_SECONDS.observe(stats.seconds)
        metrics.DPO_LOSS.set(stats.loss)
        metrics.DPO_MARGIN.set(stats.margin)
        # The step's compute in all, and how much of it gradient batching ran as the pairs arrived.
        log.info(
            "DPO step %d: loss %.4f margin %.4f (%.1f s, %.1f s of it as the pairs arrived)",
            self.state.steps,
            stats.loss,
            stats.margin,
            stats.seconds,
            stats.seconds - stats.final_seconds,
        )
        return stats

    def fault(self, point: FaultPoint) -> None:
        """``settings.fault``: SIGKILL this process the ``fault_hit``-th time ``point`` is reached (tests)."""
        if self.settings.fault != point:
            return
        self._fault_hits += 1
        if self._fault_hits == self.settings.fault_hit:
            log.warning("fault point %s reached (hit %d): SIGKILL", point, self._fault_hits)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def publish(self, steps: list[tuple[int, list[str]]], stats: StepStats) -> int:
        with self.publishing:
            return self._publish(steps, stats)

    def _publish(self, steps: list[tuple[int, list[str]]], stats: StepStats) -> int:
        settings = self.settings
        name = settings.dpo.learner_name
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=settings.cache_dir, prefix=save_prefix(settings)) as tmp:
            weights = Path(tmp) / "weights"
            self.core.save(weights, optimizer=settings.dpo.keep_optimizer_state)
            saved = time.monotonic()
            version = self.store.publish(
                weights,
                parent=self.state.version,
                base_model=self.core.base_model,
                train_steps=self.state.steps,
                offsets=self.next_offsets,
                metrics=stats.as_dict(),
                kind=self.core.kind,
                tags={
                    LEARNER_TAG: settings.dpo.learner_name,
                    "reference_version": self.state.reference_version,
                    "dataset": dataset_name(settings),  # the catalog whose traffic trained it
                    # A LoRA version is an adapter over the lineage's start (its DPO reference).
                    **({ADAPTER_BASE_TAG: self.state.reference_version} if self.core.kind == "lora" else {}),
                },
                actor="learner",
                reason=f"DPO step {self.state.steps}",
                extra_sql=lambda session, version_id: self._in_publish(session, version_id, name, steps),
                on_blob_write=lambda _written: self.fault("mid_blob_write"),
                # The saved files become the version's checkout: the rewriters' swap to it is then a
                # verify and a load, not an extraction of the whole blob (seconds on a loaded machine).
                give_away=True,
            )
        self.fault("after_db_commit")
        stored = time.monotonic()
        self.state.version = version.id
        self.state.offsets = dict(self.next_offsets)
        self._commit_kafka_offsets()
        self._release(version.id, stats.as_dict())
        # Between a step's end and the rewriters' swap (#17's "16th pair → served"): where the time goes.
        done = time.monotonic()
        log.info(
            "published version %d in %.1f s (save %.1f s, store %.1f s, offsets/alias/announcement %.1f s)",
            version.id,
            done - started,
            saved - started,
            stored - saved,
            done - stored,
        )
        if self.on_publish:
            self.on_publish(version.id)
        return version.id

    def _release(self, version_id: int, details: dict[str, Any]) -> None:
        """Move the alias to a committed version and announce it (also what a restart finishes). An alias an
        operator pinned is not moved, and no move is announced: the version stays published."""
        moved = self._move_alias(version_id)
        self.fault("before_announce")
        self._announce(PolicyAnnouncement(kind="version_published", version=version_id, details=details))
        if moved is None:
            return
        self._announce(
            PolicyAnnouncement(
                kind="alias_moved",
                version=version_id,
                alias=self.settings.dpo.alias,
                previous_version=moved.from_version,
            )
        )

    def _in_publish(
        self, session: Session, version_id: int, learner: str, steps: list[tuple[int, list[str]]]
    ) -> None:
        """Inside the publish transaction: the lease's epoch check first (a stale learner's publish is
        refused by the database), then the training records."""
        if self.lease is not None:
            self.lease.fence(session)
        record_steps(session, version_id, learner, steps)

    def finish_interrupted_publish(self) -> None:
        """At start, for the version this learner resumes from: a crash after its commit may have left the
        alias behind it, or its announcements unsent. Move the alias if needed and announce again (a rewriter
        already serving the version ignores the repeat)."""
        version = self.store.get(self.state.version)
        if version.tags.get(LEARNER_TAG) != self.settings.dpo.learner_name or version.status != "ready":
            return
        current = self.store.aliases().get(self.settings.dpo.alias)
        with self.publishing:
            self._commit_kafka_offsets()
            if current is None or current.version_id != version.id:
                log.warning(
                    "version %d was committed but its alias move was interrupted: finishing it", version.id
                )
                self._release(version.id, dict(version.metrics))
            else:
                self._announce(
                    PolicyAnnouncement(kind="alias_moved", version=version.id, alias=self.settings.dpo.alias)
                )

    def _commit_kafka_offsets(self) -> None:
        offsets = {}
        for key, offset in self.next_offsets.items():
            topic, partition = key.rsplit(":", 1)
            offsets[TopicPartition(topic, int(partition))] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)

    def _move_alias(self, version_id: int) -> AuditEntry | None:
        """The audit row of the move, or None when an operator pinned the alias (the store refuses the move;
        the version stays published and the learner trains on)."""
        alias = self.settings.dpo.alias
        # Fenced too: a learner taken over right after its publish must not move the alias back over the
        # new holder's later versions.
        fence = self.lease.fence if self.lease is not None else None
        try:
            entry = self.store.set_alias(
                alias, version_id, reason=f"learner published {version_id}", actor="learner", fence=fence
            )
        except AliasPinnedError as exc:
            log.warning("published version %d but did not move %r: %s", version_id, alias, exc)
            return None
        metrics.ALIAS_VERSION.labels(alias).set(version_id)
        return entry

    def _announce(self, note: PolicyAnnouncement) -> None:
        self.producer.send(
            self.settings.topics.policy_versions, key=str(note.version).encode(), value=encode(note)
        )
        self.producer.flush()

    # -- the loop -------------------------------------------------------------------------------------------

    def run_once(self, timeout_ms: int = 500) -> int | None:
        """Poll once; train and publish if a batch is full. Returns the published version, if any."""
        need = self.settings.dpo.batch_size - len(self.pending.pairs)
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max(need, 1))
        except OffsetOutOfRangeError as exc:
            for tp, offset in exc.args[0].items():
                recover_lost_range(self.consumer, tp, offset, role="learner")
            return None
        for records in polled.values():
            for record in records:
                self.take(record)
        self._update_lag()
        if len(self.pending.pairs) < self.settings.dpo.batch_size:
            return None
        self._drop_trained()
        if len(self.pending.pairs) < self.settings.dpo.batch_size:
            return None
        self._rebase_if_rejected()
        batch_ids = [p.pair_id for p in self.pending.pairs[: self.settings.dpo.batch_size]]
        stats = self.step()
        self.fault("after_step")
        self.pending.pairs = self.pending.pairs[self.settings.dpo.batch_size :]
        self._unpublished.append((self.state.steps, batch_ids))
        if self.state.steps % self.settings.dpo.publish_every != 0:
            return None
        version = self.publish(self._unpublished, stats)
        self._unpublished = []
        return version

    def _drop_trained(self) -> None:
        """Drop queued pairs this lineage already trained (a re-emission, a redelivery): one indexed query."""
        with self.store.read_session() as session:
            done = already_trained(session, self.settings.dpo.learner_name, self.pending.ids)
        if done:
            log.info("skipping %d pairs already trained: %s", len(done), sorted(done)[:5])
            redelivered = [p for p in self.pending.pairs if p.pair_id in done]
            self.core.forget_reference(training_triples(redelivered, self.settings.dpo.echo_rejected))
            self.pending.pairs = [p for p in self.pending.pairs if p.pair_id not in done]

    def _rebase_if_rejected(self) -> None:
        """Before a step: when the weights being trained belong to a version the canary job rejected, load
        the start alias's version instead (a new reference and optimizer too), rather than keep improving a
        policy that shoppers already measured as worse. One database read per step."""
        if self.store.get(self.state.version).status != "rejected":
            return
        start = rebase_target(self.store, self.settings, rejected=self.state.version)
        self._unpublished = []  # steps on the rejected weights are discarded with them
        make_core = self.make_core or DPOLearnerCore.from_versions
        reference = reference_of(start)
        self.core = make_core(self.settings, self.store, policy_version=start.id, reference_version=reference)
        self.state.version, self.state.reference_version = start.id, reference
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
        self.finish_interrupted_publish()
        while not self.stop_requested.is_set() and not self.lease_lost():
            if self.heartbeat is not None:
                self.heartbeat.beat()
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
            version_at_deadline = self.state.version
            with self.publishing:
                log.warning(
                    "stop deadline of %.0f s passed: %s",
                    deadline_s,
                    what_the_deadline_left(version_at_deadline, self.state.version),
                )
                logging.shutdown()
                os._exit(0)

        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()

    def reload(self, fresh: Settings) -> None:
        """SIGHUP: apply the settings that are safe to change between steps (see ``RELOADABLE``)."""
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


def save_prefix(settings: Settings) -> str:
    """Name prefix of this learner's temporary save directories in ``cache_dir`` (one per publish)."""
    return f"qrloop-save-{settings.dpo.learner_name}-"


def remove_stale_saves(settings: Settings) -> list[Path]:
    """A learner killed mid-publish leaves its save directory (a full copy of the weights) behind; at start
    nothing of this learner can be in progress, so every one of them is stale."""
    stale = sorted(p for p in settings.cache_dir.glob(f"{save_prefix(settings)}*") if p.is_dir())
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a learner that stopped mid-publish", path)
    return stale


def seek_to_stored_offsets(consumer: KafkaConsumer, settings: Settings, state: LearnerState) -> None:
    """Assign every partition of the pair topic and seek to where the latest version's offsets say."""
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


def recover_lost_range(consumer: KafkaConsumer, tp: TopicPartition, offset: int, *, role: str) -> None:
    """The stored position ``offset`` is no longer in the partition: report the lost range
    (:func:`qrloop.topics.report_out_of_range`) and read on from the earliest record still there."""
    start = consumer.beginning_offsets([tp])[tp]
    end = consumer.end_offsets([tp])[tp]
    report_out_of_range(role, tp.topic, tp.partition, offset, start, end)
    consumer.seek(tp, start)


def build(
    settings: Settings, lease: LearnerLease | None = None, make_core: CoreFactory | None = None
) -> Learner:
    """A learner resumed from the store. ``lease``: already acquired, fences its publishes (``run`` passes
    one; tests that drive ``run_once`` by hand may leave it out). ``make_core``: how weights are loaded
    (default ``DPOLearnerCore.from_versions``; ``learner.distributed`` passes its data-parallel one)."""
    remove_stale_saves(settings)
    store = open_store(settings)
    state = resume_state(store, settings)
    core = (make_core or DPOLearnerCore.from_versions)(
        settings, store, policy_version=state.version, reference_version=state.reference_version
    )
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"{settings.dpo.learner_name}-learner",
        enable_auto_commit=False,  # offsets live in the database with the version; see the module docstring
        # No silent reset: an out-of-range position raises, and recover_lost_range reports the gap.
        auto_offset_reset="none",
        client_id=f"{settings.kafka.client_id}-learner",
    )
    seek_to_stored_offsets(consumer, settings, state)
    producer = make_producer(settings)
    learner = Learner(settings, store, core, state, consumer, producer)
    learner.lease = lease
    learner.make_core = make_core
    return learner


def run(make_core: CoreFactory | None = None) -> None:
    """``qrloop learn``: the long-running learner, its probes and metrics on ``dpo.metrics_port``.

    SIGTERM/SIGINT: stop after the step in progress, or abandon it past ``dpo.stop_deadline_s`` (exit 0
    either way); SIGHUP: reload the log level and the ``RELOADABLE`` DPO settings.
    """
    settings = get_settings()
    loaded: dict[str, Learner] = {}

    def model_check() -> str:
        if "learner" not in loaded:
            raise RuntimeError("standby for the lineage's lease, or loading the models")
        return f"version {loaded['learner'].state.version} loaded"

    heartbeat = health.Heartbeat(settings.daemon.liveness_max_age_s, settings.daemon.liveness_start_grace_s)
    health.serve(
        settings.dpo.metrics_port,
        {
            "broker": health.kafka_check(settings.kafka.bootstrap_servers),
            "database": health.database_check(settings.db_url),
            "model": model_check,
        },
        role="learner",
        heartbeat=heartbeat,
    )
    lease = LearnerLease.for_settings(settings, open_store(settings))
    while True:
        # Until the loop runs there is nothing to finish: a stop while waiting or loading just exits.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sys.exit(0))
        # A standby is alive while it waits: its heartbeat goes on, or the supervisor would restart it.
        lease.wait_until_acquired(threading.Event(), on_poll=heartbeat.beat)
        if not train_while_holding(settings, lease, loaded, make_core, heartbeat):
            lease.release()
            return
        loaded.clear()


def train_while_holding(
    settings: Settings,
    lease: LearnerLease,
    loaded: dict[str, Learner],
    make_core: CoreFactory | None,
    heartbeat: health.Heartbeat,
) -> bool:
    """Resume and train until a stop (False) or until the lease is lost to another learner (True)."""
    learner = loaded["learner"] = build(settings, lease, make_core)
    learner.heartbeat = heartbeat
    metrics.ALIAS_VERSION.labels(settings.dpo.alias).set(learner.state.version)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: learner.request_stop(learner.settings.dpo.stop_deadline_s))
    reload_on_sighup("learner", learner.reload)
    log.info(
        "learner resuming at version %d (reference %d, step %d): %s",
        learner.state.version,
        learner.state.reference_version,
        learner.state.steps,
        learner.core.config.loss_summary(),
    )
    learner.run()
    learner.consumer.close()
    learner.producer.close()
    if learner.lease_lost():
        log.warning("lease lost at version %d: back to standby", learner.state.version)
        return True
    return False


def what_the_deadline_left(version_at_deadline: int, version_now: int) -> str:
    """The stop watchdog's last word. It waits for a publish in progress, so the step it abandons may be the
    one just published: saying "nothing committed" then would send an operator looking for a loss."""
    if version_now != version_at_deadline:
        return (
            f"the publish in progress finished first (version {version_now}, with its offsets, alias and "
            f"announcement); stopping there, the next start resumes from its offsets"
        )
    return (
        f"abandoning the step in progress; nothing of it was committed, the next start redoes it from "
        f"version {version_now}'s offsets"
    )
