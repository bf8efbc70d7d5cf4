"""The canary job: every ``canary.interval_s`` judge the candidate on all the evidence since it went live.

Pure parts first (tested with plain values): ``OutcomeLog`` keeps the ``QueryOutcome``s of the versions the
aliases hold; ``decide`` turns the two arms' samples and the canary's state into a ``Decision``
(``qrloop.canary.analyse``, an always-valid sequential test, plus the traffic-share steps). ``CanaryJob`` is
the I/O around them: it reads the outcome topic, the aliases and the verdict history from the policy store,
and acts:

- **promote**: ``production`` → the canary version;
- **roll back as worse**: ``canary`` → production's version, and the candidate is marked ``rejected``;
- **inconclusive**: no verdict within ``max_queries`` / ``max_analyses``: ``canary`` → production's
  version, and the candidate is ``archived``, not called worse;
- **continue**: keep collecting, stepping the share up (10% → 25% → 50%) after a healthy look.

Evidence accumulates for as long as the candidate is live (the test is valid at every look, so there is no
window to restart): canary-arm outcomes served by the candidate, and production-arm outcomes served by
production's version since the candidate's first query (concurrent traffic only, in event time).

The policy store's audit log is the canary's state: every verdict is a ``canary_verdict`` row carrying its
statistics and the share, so the job and the rewriter recover the share and the number of analyses after a
restart, and the job re-reads the candidate's outcomes from the topic. Promote, roll back and inconclusive
commit together with their alias moves (``PolicyStore.conclude_canary``), which respects an operator's pin.
Every verdict is also announced on the policy-versions topic, followed by the ``alias_moved`` it caused; the
rewriters also reconcile with the store every ``rewriter.reconcile_s``, so a lost announcement only delays.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from policy_store import AliasRecord, AuditEntry, PolicyStore, PolicyStoreError
from qrloop import metrics
from qrloop.canary import Analysis, ArmSamples, CanaryPolicy, analyse, next_share
from qrloop.events import PolicyAnnouncement, QueryOutcome, SchemaError, check_event_time, decode, encode
from qrloop.runs import open_store
from qrloop.settings import CanarySettings, Settings, get_settings
from qrloop.topics import ensure_topics, make_producer, send_dead_letter

log = logging.getLogger("qrloop.canary")
Action = Literal["idle", "promote", "continue", "rollback", "inconclusive"]
# What each final verdict means to a reader of the audit log and of `qrloop canary status`.
OUTCOMES = {"promote": "promoted", "rollback": "rolled back as worse", "inconclusive": "inconclusive"}
ACTOR = "canary"
# A restarted job reads outcomes from this long before the candidate's alias move (clock skew, late records).
RESTART_SLACK_S = 120.0


# ------------------------------------------------------------------------------------------------ pure parts


def policy_of(config: CanarySettings) -> CanaryPolicy:
    return CanaryPolicy(
        min_samples=config.min_samples,
        alpha=config.alpha,
        guard_alpha=config.guard_alpha,
        design_lift=config.design_lift,
        relevance_margin=config.relevance_margin,
        max_kl=config.max_kl,
        max_queries=config.max_queries,
        max_analyses=config.max_analyses,
    )


class OutcomeLog:
    """The outcomes the current comparison may use, as they arrive (late ones included).

    Event time, like the aggregator's windows: a replay of logged traffic at any speed is analysed as the
    live run was.
    """

    def __init__(self) -> None:
        self._items: list[QueryOutcome] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[QueryOutcome]:
        return iter(self._items)

    def add(self, outcome: QueryOutcome) -> None:
        self._items.append(outcome)

    def keep_only(self, versions: set[int]) -> None:
        """Forget outcomes of versions no alias holds any more: they are evidence about nothing current."""
        if any(o.policy_version not in versions for o in self._items):
            self._items = [o for o in self._items if o.policy_version in versions]

    def since_canary(self, production_version: int, canary_version: int) -> tuple[ArmSamples, ArmSamples]:
        """The candidate's queries, and production's queries since the candidate's first one (event time):
        the two arms over the same stretch of traffic."""
        canary = [o for o in self._items if o.arm == "canary" and o.policy_version == canary_version]
        if not canary:
            return _samples([]), _samples([])
        start = min(o.event_time for o in canary)
        production = [
            o
            for o in self._items
            if o.arm == "production" and o.policy_version == production_version and o.event_time >= start
        ]
        return _samples(production), _samples(canary)


def _samples(outcomes: list[QueryOutcome]) -> ArmSamples:
    return ArmSamples(
        rewards=[o.reward for o in outcomes],
        relevance=[o.relevance for o in outcomes],
        kl_to_reference=[o.kl_to_reference for o in outcomes if o.kl_to_reference is not None],
    )


@dataclass(frozen=True)
class CanaryState:
    """What the store says: the versions the two aliases hold, the canary's share and its history."""

    production_version: int
    canary_version: int | None  # None: no canary alias, or it holds production's version (nothing to test)
    share: float
    analyses: int = 0  # analyses of this candidate so far that had enough queries in both arms
    reward_tau: float | None = None  # the reward test's spread, fixed by the first of them (None: none yet)


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
    analysis = analyse(production, canary, policy_of(config), state.analyses, state.reward_tau)
    share = state.share
    healthy_but_inconclusive = analysis.verdict == "continue" and analysis.tested
    if healthy_but_inconclusive:
        share = next_share(state.share, config.share_steps)
    details = {k: _finite(v) for k, v in analysis.as_dict().items()}
    details.update(
        production_version=state.production_version,
        canary_version=state.canary_version,
        share=share,
        previous_share=state.share,
        analyses=state.analyses + (1 if analysis.tested else 0),
        outcome=OUTCOMES.get(analysis.verdict),
    )
    return Decision(analysis.verdict, analysis.reason, share, analysis, details)


# ------------------------------------------------------------------------------------ state from the store


def _verdicts(store: PolicyStore, version: int, alias: str) -> list[AuditEntry]:
    return [e for e in store.audit(action="canary_verdict", version=version, limit=None) if e.alias == alias]


def canary_share(store: PolicyStore, version: int, config: CanarySettings) -> float:
    """The share ``version`` is served at: the last verdict's share, else the first step."""
    for entry in _verdicts(store, version, config.canary_alias):  # newest first
        share = entry.details.get("share")
        if isinstance(share, int | float):
            return float(share)
    return config.share_steps[0]


def canary_state(store: PolicyStore, config: CanarySettings) -> CanaryState | None:
    """The canary's state as the store has it; None when there is no production alias yet."""
    aliases = store.aliases()
    production = aliases.get(config.production_alias)
    if production is None:
        return None
    holder = aliases.get(config.canary_alias)
    if holder is None or holder.version_id == production.version_id:
        return CanaryState(production.version_id, None, config.share_steps[0])
    history = _verdicts(store, holder.version_id, config.canary_alias)
    analyses = sum(
        1
        for e in history
        if e.details.get("verdict") == "continue" and e.details.get("effect_low") is not None
    )
    return CanaryState(
        production.version_id,
        holder.version_id,
        canary_share(store, holder.version_id, config),
        analyses,
        _reward_tau(history),
    )


def _reward_tau(history: list[AuditEntry]) -> float | None:
    """The spread the candidate's first tested analysis fixed (every later one repeats it; see
    ``qrloop.canary.design_tau``): a restarted job goes on with the same sequence."""
    for entry in reversed(history):  # oldest first: the first one fixed it
        tau = entry.details.get("reward_tau")
        if isinstance(tau, int | float) and tau > 0:
            return float(tau)
    return None


def canary_started_at(store: Any, config: CanarySettings) -> datetime | None:
    """When the canary alias last moved to the version it holds (None: no canary alias)."""
    for entry in store.history(config.canary_alias) if config.canary_alias in store.aliases() else []:
        if entry.action in ("set_alias", "rollback") and entry.to_version is not None:
            return cast(datetime, entry.at)
    return None


# --------------------------------------------------------------------------------------------------- the job


class CanaryJob:
    """One analysis per ``tick()``: read new outcomes, decide, act, announce. Not thread-safe: one tick at a
    time (the scheduler runs it with ``max_instances=1``)."""

    def __init__(self, settings: Settings, store: PolicyStore, producer: KafkaProducer) -> None:
        self.settings = settings
        self.config = settings.canary
        self.store = store
        self.producer = producer
        self.outcomes = OutcomeLog()
        self.last: Decision | None = None
        self._partition = TopicPartition(settings.topics.query_outcomes, 0)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            client_id=f"{settings.kafka.client_id}-canary",
        )
        self.consumer.assign([self._partition])
        self._seek_to_canary_start()

    def _seek_to_canary_start(self) -> None:
        """Start (by record time, with a few minutes' slack for clocks and late outcomes) where the live
        candidate went live, so a restarted job re-reads all its evidence; with no candidate, at the end."""
        started = canary_started_at(self.store, self.config)
        if started is None:
            self.consumer.seek_to_end(self._partition)
            self.consumer.position(self._partition)
            return
        since_ms = int((started.timestamp() - RESTART_SLACK_S) * 1000)
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
        """Read every outcome published before this call; returns how many were read.

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

    def _take(self, record: ConsumerRecord) -> None:
        """One outcome into the evidence, or to the dead-letter topic: never an exception, which would skip
        the rest of the batch (the position is already past it)."""
        try:
            outcome = decode(QueryOutcome, record.value)
            # One outcome from the future would move the evidence's clock past every real one.
            bounds = self.settings.event_time
            check_event_time(outcome.event_time, max_future_s=bounds.max_future_s, max_age_s=bounds.max_age_s)
            self.outcomes.add(outcome)
        except SchemaError as exc:
            send_dead_letter(self.producer, self.settings, record, exc.reason, str(exc))
        except Exception as exc:
            log.exception("unprocessable outcome at offset %d", record.offset)
            send_dead_letter(
                self.producer, self.settings, record, "unprocessable", f"{type(exc).__name__}: {exc}"
            )

    def tick(self) -> Decision | None:
        """Analyse the evidence so far and act on the verdict. None when there is no production alias."""
        self.poll()
        state = canary_state(self.store, self.config)
        if state is None:
            return None
        if state.canary_version is None:
            self.outcomes.keep_only(set())  # a candidate's evidence starts at its first query
            production, canary = _samples([]), _samples([])
        else:
            self.outcomes.keep_only({state.production_version, state.canary_version})
            production, canary = self.outcomes.since_canary(state.production_version, state.canary_version)
        for arm, samples in (("production", production), ("canary", canary)):
            if samples.rewards:
                metrics.REWARD_AVG.labels(arm).set(sum(samples.rewards) / len(samples.rewards))
        decision = decide(state, production, canary, self.config)
        if decision.action != "idle":
            self.act(state, decision)
        self.last = decision
        return decision

    def act(self, state: CanaryState, decision: Decision) -> None:
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
                assert decision.action != "idle"  # tick() acts on every verdict but idle
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
        else:  # rolled back as worse, or inconclusive: the canary alias returns to production's version
            notes.append(_moved(config.canary_alias, production, canary))
            metrics.ALIAS_VERSION.labels(config.canary_alias).set(production)
        self.announce(notes)

    def announce(self, notes: Iterable[PolicyAnnouncement]) -> None:
        for note in notes:
            self.producer.send(self.settings.topics.policy_versions, key=note.kafka_key(), value=encode(note))
        self.producer.flush()


def _moved(alias: str, version: int, previous: int) -> PolicyAnnouncement:
    return PolicyAnnouncement(kind="alias_moved", version=version, alias=alias, previous_version=previous)


def build_scheduler(job: CanaryJob, interval_s: float) -> BackgroundScheduler:
    """A background APScheduler running ``job.tick`` every ``interval_s``: one worker thread, one tick at a
    time, and ticks missed while one ran are coalesced into one (an analysis of "now" supersedes them)."""
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone="UTC",
    )
    scheduler.add_job(_safe_tick(job), "interval", seconds=interval_s, id="canary-analysis")
    return scheduler


def _safe_tick(job: CanaryJob) -> Callable[[], None]:
    def tick() -> None:
        try:
            job.tick()
        except Exception:  # one failed analysis (database restart, broker blip) must not stop the schedule
            log.exception("canary analysis failed; trying again at the next interval")

    return tick


def summary(store: PolicyStore, config: CanarySettings, limit: int = 5) -> dict[str, Any]:
    """What ``qrloop canary status`` shows: aliases, share and the latest verdicts with their statistics."""
    aliases: Mapping[str, AliasRecord] = store.aliases()
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
        "analyses": state.analyses if state is not None else 0,
        "verdicts": [
            {"at": e.at.isoformat(), "version": e.to_version, "reason": e.reason, **e.details}
            for e in verdicts
        ],
    }


def run() -> None:
    """``qrloop canary run``: the canary job until SIGTERM/SIGINT (a tick in flight is finished first)."""
    settings = get_settings()
    ensure_topics(settings)
    store = open_store(settings)
    producer = make_producer(settings)
    job = CanaryJob(settings, store, producer)
    scheduler = build_scheduler(job, settings.canary.interval_s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.start()
    log.info(
        "canary job: every %.0f s, at most %d canary queries, shares %s",
        settings.canary.interval_s,
        settings.canary.max_queries,
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
