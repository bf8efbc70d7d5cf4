"""The canary job: every ``canary.interval_s`` compare the arms over the last window and act on the verdict.

Pure parts first (tested with plain values): ``OutcomeWindow`` keeps the last ``window_s`` of event time of
``QueryOutcome`` samples; ``decide`` turns the two arms' samples and the canary's state into a ``Decision``
(``qrloop.canary.analyse`` plus the traffic-share steps). ``CanaryJob`` is the I/O around them: it reads the
outcome topic, the aliases and the verdict history from the policy store, and acts:

- **promote**: ``production`` → the canary version;
- **roll back**: ``canary`` → production's version, and the canary version is marked rejected;
- **continue**: keep collecting, stepping the share up (10% → 25% → 50%) after an inconclusive but
  healthy analysis (both arms have enough samples and the guards pass).

The policy store's audit log is the canary's state: every verdict is a ``canary_verdict`` row carrying its
statistics and the share, so the job and the rewriter recover the share and the number of inconclusive
windows after a restart. Promote and roll back commit together with their alias moves
(``PolicyStore.conclude_canary``). Every verdict is also announced on the policy-versions topic, followed
by the ``alias_moved`` it caused, which the rewriters follow.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qrloop import metrics
from qrloop.canary import Analysis, ArmSamples, CanaryPolicy, analyse, next_share
from qrloop.events import (
    DeadLetter,
    PolicyAnnouncement,
    QueryOutcome,
    SchemaError,
    check_event_time,
    decode,
    encode,
)
from qrloop.settings import CanarySettings, Settings

log = logging.getLogger("qrloop.canary")
Action = Literal["idle", "promote", "continue", "rollback"]
ACTOR = "canary"


# ------------------------------------------------------------------------------------------------ pure parts


def policy_of(config: CanarySettings) -> CanaryPolicy:
    return CanaryPolicy(
        min_samples=config.min_samples,
        alpha=config.alpha,
        min_effect=config.min_effect,
        relevance_floor=config.relevance_floor,
        max_kl=config.max_kl,
        max_windows=config.max_windows,
    )


class OutcomeWindow:
    """The outcomes of the last ``window_s`` seconds of *event* time (the newest outcome's time is "now").

    Event time, like the aggregator's windows: a replay of logged traffic at any speed is analysed as the
    live run was, and an idle night does not empty the window.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._items: deque[QueryOutcome] = deque()
        self.now = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, outcome: QueryOutcome) -> None:
        self._items.append(outcome)
        self.now = max(self.now, outcome.event_time.timestamp())

    def prune(self) -> None:
        # Not strictly time-ordered (late outcomes), so filter rather than pop from the left only.
        start = self.now - self.window_s
        if self._items and min(o.event_time.timestamp() for o in self._items) < start:
            self._items = deque(o for o in self._items if o.event_time.timestamp() >= start)

    def samples(self, arm: str, version: int | None) -> ArmSamples:
        """Samples of one arm served by one version (a query served by any other version is not evidence)."""
        self.prune()
        chosen = [o for o in self._items if o.arm == arm and o.policy_version == version]
        return ArmSamples(
            rewards=[o.reward for o in chosen],
            relevance=[o.relevance for o in chosen],
            kl_to_reference=[o.kl_to_reference for o in chosen if o.kl_to_reference is not None],
        )


@dataclass(frozen=True)
class CanaryState:
    """What the store says: the versions the two aliases hold, the canary's share and its history."""

    production_version: int
    canary_version: int | None  # None: no canary alias, or it holds production's version (nothing to test)
    share: float
    inconclusive_windows: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    share: float  # the canary's share after this decision
    analysis: Analysis | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _finite(value: Any) -> Any:
    # NaN (a mean of no samples) is neither valid JSON for PostgreSQL nor allowed in events: say "unknown".
    return None if isinstance(value, float) and not math.isfinite(value) else value


def decide(
    state: CanaryState, production: ArmSamples, canary: ArmSamples, config: CanarySettings
) -> Decision:
    """The verdict on the canary and the share that follows from it (no I/O)."""
    if state.canary_version is None:
        return Decision("idle", "no canary to analyse", state.share)
    analysis = analyse(production, canary, policy_of(config), state.inconclusive_windows)
    share = state.share
    healthy_but_inconclusive = analysis.verdict == "continue" and analysis.p_value is not None
    if healthy_but_inconclusive:
        share = next_share(state.share, config.share_steps)
    details = {k: _finite(v) for k, v in analysis.as_dict().items()}
    details.update(
        production_version=state.production_version,
        canary_version=state.canary_version,
        share=share,
        previous_share=state.share,
        window_s=config.window_s,
        inconclusive_windows=state.inconclusive_windows + (1 if healthy_but_inconclusive else 0),
    )
    return Decision(analysis.verdict, analysis.reason, share, analysis, details)


# ------------------------------------------------------------------------------------ state from the store


def _verdicts(store: Any, version: int, alias: str) -> list[Any]:
    return [e for e in store.audit(action="canary_verdict", version=version, limit=None) if e.alias == alias]


def canary_share(store: Any, version: int, config: CanarySettings) -> float:
    """The share ``version`` is served at: the last verdict's share, else the first step."""
    for entry in _verdicts(store, version, config.canary_alias):  # newest first
        share = entry.details.get("share")
        if isinstance(share, int | float):
            return float(share)
    return config.share_steps[0]


def canary_state(store: Any, config: CanarySettings) -> CanaryState | None:
    """The canary's state as the store has it; None when there is no production alias yet."""
    aliases = store.aliases()
    production = aliases.get(config.production_alias)
    if production is None:
        return None
    holder = aliases.get(config.canary_alias)
    if holder is None or holder.version_id == production.version_id:
        return CanaryState(production.version_id, None, config.share_steps[0])
    history = _verdicts(store, holder.version_id, config.canary_alias)
    inconclusive = sum(
        1 for e in history if e.details.get("verdict") == "continue" and e.details.get("p_value") is not None
    )
    return CanaryState(
        production.version_id, holder.version_id, canary_share(store, holder.version_id, config), inconclusive
    )


# --------------------------------------------------------------------------------------------------- the job


class CanaryJob:
    """One analysis per ``tick()``: read new outcomes, decide, act, announce. Not thread-safe: one tick at a
    time (the scheduler runs it with ``max_instances=1``)."""

    def __init__(self, settings: Settings, store: Any, producer: Any) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.settings = settings
        self.config = settings.canary
        self.store = store
        self.producer = producer
        self.window = OutcomeWindow(self.config.window_s)
        self.last: Decision | None = None
        self._partition = TopicPartition(settings.topics.query_outcomes, 0)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            client_id=f"{settings.kafka.client_id}-canary",
        )
        self.consumer.assign([self._partition])
        self._seek_to_window()

    def _seek_to_window(self) -> None:
        """Start where the last window began (by record time, with a window's slack), so a restarted job
        analyses the same window instead of waiting for a fresh one."""
        since_ms = int((time.time() - 2 * self.config.window_s) * 1000)
        found = self.consumer.offsets_for_times({self._partition: max(since_ms, 0)})
        position = found.get(self._partition)
        if position is None:  # nothing that recent: only outcomes from now on
            self.consumer.seek_to_end(self._partition)
            # seek_to_end is lazy; resolve it now, or outcomes sent before the first poll would be skipped.
            self.consumer.position(self._partition)
        else:
            self.consumer.seek(self._partition, position.offset)

    def close(self) -> None:
        self.consumer.close()

    def poll(self, timeout_s: float = 10.0) -> int:
        """Read every outcome published before this call into the window; returns how many were read.

        "Until the end offset seen at the start", not "until a poll comes back empty": an empty poll only
        means the next fetch has not arrived yet, and an analysis must not miss outcomes already published.
        """
        end = self.consumer.end_offsets([self._partition])[self._partition]
        deadline = time.monotonic() + timeout_s
        read = 0
        while self.consumer.position(self._partition) < end and time.monotonic() < deadline:
            for batch in self.consumer.poll(timeout_ms=200, max_records=5000).values():
                for record in batch:
                    self._take(record)
                read += len(batch)
        return read

    def _take(self, record: Any) -> None:
        """One outcome into the window, or to the dead-letter topic: never an exception, which would skip
        the rest of the batch (the position is already past it)."""
        try:
            outcome = decode(QueryOutcome, record.value)
            # The window's "now" is the newest event time: one outcome from the future would empty it.
            bounds = self.settings.event_time
            check_event_time(outcome.event_time, max_future_s=bounds.max_future_s, max_age_s=bounds.max_age_s)
            self.window.add(outcome)
        except SchemaError as exc:
            self._dead_letter(record, exc.reason, str(exc))
        except Exception as exc:
            log.exception("unprocessable outcome at offset %d", record.offset)
            self._dead_letter(record, "unprocessable", f"{type(exc).__name__}: {exc}")

    def _dead_letter(self, record: Any, reason: str, error: str) -> None:
        letter = DeadLetter.of(record.topic, record.partition, record.offset, reason, error, record.value)
        metrics.DEAD_LETTERS.labels(reason).inc()
        self.producer.send(self.settings.topics.dead_letter, key=record.key, value=encode(letter))

    def tick(self) -> Decision | None:
        """Analyse the current window and act on the verdict. None when there is no production alias."""
        self.poll()
        state = canary_state(self.store, self.config)
        if state is None:
            return None
        production = self.window.samples("production", state.production_version)
        canary = self.window.samples("canary", state.canary_version)
        for arm, samples in (("production", production), ("canary", canary)):
            if samples.rewards:
                metrics.REWARD_AVG.labels(arm).set(sum(samples.rewards) / len(samples.rewards))
        decision = decide(state, production, canary, self.config)
        if decision.action != "idle":
            self.act(state, decision)
        self.last = decision
        return decision

    def act(self, state: CanaryState, decision: Decision) -> None:
        from policy_store import PolicyStoreError

        assert state.canary_version is not None
        config, canary, production = self.config, state.canary_version, state.production_version
        reason = f"{decision.action}: {decision.reason}"
        log.info("canary %d vs production %d: %s (share %.2f)", canary, production, reason, decision.share)
        try:
            if decision.action == "continue":
                # "passed" stays null: no decision yet (the store's default would read as a failure).
                self.store.record_canary_verdict(
                    canary,
                    passed=False,
                    details={**decision.details, "verdict": "continue", "passed": None},
                    alias=config.canary_alias,
                    reason=reason,
                    actor=ACTOR,
                )
            else:
                self.store.conclude_canary(
                    canary,
                    decision.action,
                    production_version=production,
                    details=decision.details,
                    production_alias=config.production_alias,
                    canary_alias=config.canary_alias,
                    reason=reason,
                    actor=ACTOR,
                )
        except PolicyStoreError as exc:
            # E.g. the learner published a newer candidate meanwhile: this verdict is about the past.
            log.warning("canary verdict not applied: %s", exc)
            return
        notes = [
            PolicyAnnouncement(
                kind="canary_verdict",
                version=canary,
                alias=config.canary_alias,
                previous_version=production,
                details={**decision.details, "verdict": decision.action, "reason": decision.reason},
            )
        ]
        if decision.action == "promote":
            notes.append(_moved(config.production_alias, canary, production))
            metrics.ALIAS_VERSION.labels(config.production_alias).set(canary)
        elif decision.action == "rollback":
            notes.append(_moved(config.canary_alias, production, canary))
            metrics.ALIAS_VERSION.labels(config.canary_alias).set(production)
        self.announce(notes)

    def announce(self, notes: Iterable[PolicyAnnouncement]) -> None:
        for note in notes:
            self.producer.send(self.settings.topics.policy_versions, key=note.kafka_key(), value=encode(note))
        self.producer.flush()


def _moved(alias: str, version: int, previous: int) -> PolicyAnnouncement:
    return PolicyAnnouncement(kind="alias_moved", version=version, alias=alias, previous_version=previous)


def build_scheduler(job: CanaryJob, interval_s: float) -> Any:
    """A background APScheduler running ``job.tick`` every ``interval_s``: one worker thread, one tick at a
    time, and ticks missed while one ran are coalesced into one (an analysis of "now" supersedes them)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone="UTC",
    )
    scheduler.add_job(_safe_tick(job), "interval", seconds=interval_s, id="canary-analysis")
    return scheduler


def _safe_tick(job: CanaryJob) -> Any:
    def tick() -> None:
        try:
            job.tick()
        except Exception:  # one failed analysis (database restart, broker blip) must not stop the schedule
            log.exception("canary analysis failed; trying again at the next interval")

    return tick


def summary(store: Any, config: CanarySettings, limit: int = 5) -> dict[str, Any]:
    """What ``qrloop canary status`` shows: aliases, share and the latest verdicts with their statistics."""
    aliases: Mapping[str, Any] = store.aliases()
    state = canary_state(store, config)
    verdicts = [
        e
        for e in store.audit(action="canary_verdict", alias=config.canary_alias, limit=limit)
        if e.alias == config.canary_alias
    ]
    return {
        "production": aliases[config.production_alias].version_id
        if config.production_alias in aliases
        else None,
        "canary": aliases[config.canary_alias].version_id if config.canary_alias in aliases else None,
        "live": state is not None and state.canary_version is not None,
        "share": state.share if state is not None and state.canary_version is not None else 0.0,
        "inconclusive_windows": state.inconclusive_windows if state is not None else 0,
        "verdicts": [
            {"at": e.at.isoformat(), "version": e.to_version, "reason": e.reason, **e.details}
            for e in verdicts
        ],
    }


def run() -> None:
    """``qrloop canary run``: the canary job until SIGTERM/SIGINT (a tick in flight is finished first)."""
    from kafka import KafkaProducer

    from policy_store import PolicyStore
    from qrloop.settings import get_settings
    from qrloop.topics import ensure_topics

    settings = get_settings()
    ensure_topics(settings)
    store = PolicyStore.from_settings(settings)
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True, acks="all"
    )
    job = CanaryJob(settings, store, producer)
    scheduler = build_scheduler(job, settings.canary.interval_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.start()
    log.info(
        "canary job: every %.0f s, window %.0f s, shares %s",
        settings.canary.interval_s,
        settings.canary.window_s,
        settings.canary.share_steps,
    )
    try:
        stop.wait()
    finally:
        scheduler.shutdown(wait=True)  # each verdict is one transaction: nothing is left half-done
        job.close()
        producer.flush()
        producer.close()
        store.close()
