"""The canary job on the real broker and both databases: outcomes in, verdicts out, aliases moved.

The arms' outcomes are synthetic ``QueryOutcome`` events published to the real outcome topic, built so that
the canary is worse, better, or reward-hacking by construction; everything after that (the topic, the window,
the analysis, the store's transaction, the announcements) is the production code path.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from policy_store import PolicyStore, db
from qrloop.canary import ArmSamples
from qrloop.canary_job import (
    CanaryJob,
    CanaryState,
    OutcomeLog,
    build_scheduler,
    canary_share,
    canary_state,
    decide,
    summary,
)
from qrloop.events import PolicyAnnouncement, QueryOutcome, decode, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import CanarySettings, Settings
from qrloop.topics import ensure_topics

CONFIG = CanarySettings(min_samples=30, interval_s=0.3, share_steps=[0.1, 0.25, 0.5])


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tokenizer_dir = require_policy(Settings())
    return [build_tiny_policy(tmp_path_factory.mktemp(f"w{i}"), tokenizer_dir, seed=i) for i in range(3)]


@dataclass
class Env:
    settings: Settings
    store: PolicyStore
    producer: KafkaProducer
    production: int
    canary: int
    spare: int

    def outcomes(
        self,
        arm: str,
        version: int,
        reward: float,
        relevance: float = 0.6,
        n: int = 60,
        seed: int = 0,
        kl: float | None = None,
        start: datetime | None = None,
    ) -> None:
        """Publish ``n`` outcomes of one arm whose rewards scatter around ``reward``."""
        rng = np.random.default_rng(seed)
        start = start or datetime.now(UTC)
        for i in range(n):
            r = float(np.clip(rng.normal(reward, 0.08), 0, 1))
            outcome = QueryOutcome(
                query_event_id=str(uuid.uuid4()),
                event_time=start + timedelta(seconds=i),
                policy_version=version,
                arm=arm,
                reward=r,
                relevance=float(np.clip(rng.normal(relevance, 0.03), 0, 1)),
                rewards=[r, r],
                logprobs=[-5.0, -6.0],
                kl_to_reference=kl,
                tie=False,
            )
            self.producer.send(
                self.settings.topics.query_outcomes, key=outcome.kafka_key(), value=encode(outcome)
            )
        self.producer.flush()

    def announcements(self) -> list[PolicyAnnouncement]:
        consumer = KafkaConsumer(
            self.settings.topics.policy_versions,
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=1500,
        )
        try:
            return [decode(PolicyAnnouncement, m.value) for m in consumer]
        finally:
            consumer.close()


@pytest.fixture
def env(settings: Settings, kafka_bootstrap: str, unique_topic: str, weights: list[Path]) -> Iterator[Env]:
    topics = settings.topics.model_copy(
        update={
            "query_outcomes": f"{unique_topic}.o",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
        }
    )
    configured = settings.model_copy(update={"topics": topics, "canary": CONFIG})
    ensure_topics(configured, {topics.query_outcomes: 1, topics.policy_versions: 1, topics.dead_letter: 1})
    db.upgrade(configured.db_url)
    store = open_store(configured)
    v1 = store.publish(weights[0], base_model="tiny")
    v2 = store.publish(weights[1], base_model="tiny", parent=v1.id)
    v3 = store.publish(weights[2], base_model="tiny", parent=v2.id)
    store.set_alias("production", v1.id)
    store.set_alias("canary", v2.id, actor="learner")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    yield Env(configured, store, producer, v1.id, v2.id, v3.id)
    producer.close()
    store.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------------------- pure decisions


def arm(mean: float, relevance: float = 0.6, n: int = 60, seed: int = 0) -> ArmSamples:
    rng = np.random.default_rng(seed)
    return ArmSamples(
        rewards=list(np.clip(rng.normal(mean, 0.08, n), 0, 1)),
        relevance=list(np.clip(rng.normal(relevance, 0.03, n), 0, 1)),
    )


def test_share_steps_up_only_after_a_healthy_inconclusive_analysis() -> None:
    state = CanaryState(production_version=1, canary_version=2, share=0.1)
    too_few = decide(state, arm(0.5, n=10), arm(0.5, n=10, seed=1), CONFIG)
    assert too_few.action == "continue" and too_few.share == 0.1, "no evidence yet: no more traffic"
    inconclusive = decide(state, arm(0.5), arm(0.5, seed=1), CONFIG)
    assert inconclusive.action == "continue" and inconclusive.share == 0.25
    assert inconclusive.details["analyses"] == 1
    assert inconclusive.details["effect_low"] < 0 < inconclusive.details["effect_high"]
    at_top = decide(CanaryState(1, 2, 0.5), arm(0.5), arm(0.5, seed=1), CONFIG)
    assert at_top.share == 0.5
    assert decide(CanaryState(1, None, 0.1), arm(0.5), arm(0.9), CONFIG).action == "idle"


def test_a_candidate_without_a_verdict_within_the_budget_is_inconclusive_not_worse() -> None:
    state = CanaryState(1, 2, 0.5, analyses=CONFIG.max_analyses - 1)
    decision = decide(state, arm(0.5), arm(0.5, seed=1), CONFIG)
    assert decision.action == "inconclusive" and f"{CONFIG.max_analyses} analyses" in decision.reason
    assert decision.details["outcome"] == "inconclusive"


def test_evidence_is_the_candidates_queries_and_production_since_its_first_one() -> None:
    log = OutcomeLog()
    t0 = datetime(2025, 1, 1, tzinfo=UTC)

    def outcome(arm: str, version: int, at_s: float, reward: float) -> QueryOutcome:
        return QueryOutcome(
            query_event_id=str(uuid.uuid4()),
            event_time=t0 + timedelta(seconds=at_s),
            policy_version=version,
            arm=arm,
            reward=reward,
            relevance=0.5,
            rewards=[reward, reward],
            logprobs=[-1.0, -1.0],
            kl_to_reference=0.2 if arm == "canary" else None,
            tie=False,
        )

    log.add(outcome("production", 1, 0, 0.1))  # before the candidate's first query: not concurrent
    log.add(outcome("production", 1, 50, 0.2))
    log.add(outcome("canary", 3, 40, 0.9))  # an earlier candidate: not evidence for version 2
    log.add(outcome("canary", 2, 45, 0.3))
    log.add(outcome("production", 7, 60, 0.8))  # another production version
    log.add(outcome("production", 1, 5000, 0.4))  # hours later still counts: no window
    production, canary = log.since_canary(1, 2)
    assert list(production.rewards) == [0.2, 0.4]
    assert list(canary.rewards) == [0.3] and list(canary.kl_to_reference) == [0.2]
    log.keep_only({1, 2})
    assert len(log) == 4


# ------------------------------------------------------------------------- the job, real broker and store


def test_worse_canary_is_rolled_back_automatically_by_the_scheduled_job(env: Env) -> None:
    """Driven by the APScheduler job itself: the first analysis with enough samples rolls back."""
    env.outcomes("production", env.production, reward=0.50, seed=1)
    env.outcomes("canary", env.canary, reward=0.30, seed=2)  # worse by construction
    job = CanaryJob(env.settings, env.store, env.producer)
    scheduler = build_scheduler(job, CONFIG.interval_s)
    scheduler.start()
    try:
        assert wait_for(lambda: env.store.resolve("canary").id == env.production, timeout_s=60)
    finally:
        scheduler.shutdown(wait=True)
        job.close()
    assert env.store.get(env.canary).status == "rejected"
    assert env.store.resolve("production").id == env.production
    # (job.last may already be a later, idle tick: the verdict is read back from the audit log.)

    verdict = env.store.audit(action="canary_verdict", version=env.canary)[0]
    assert verdict.details["verdict"] == "rollback" and verdict.details["passed"] is False
    assert verdict.details["n_canary"] == 60 and verdict.details["effect_high"] < 0
    assert verdict.details["effect"] < -0.1
    assert verdict.details["outcome"] == "rolled back as worse" and verdict.details["worse_by"] == "reward"
    assert verdict.actor == "canary" and "worse by" in verdict.reason
    assert env.store.audit(action="reject", version=env.canary)[0].actor == "canary"

    notes = env.announcements()
    assert [(n.kind, n.alias, n.version) for n in notes] == [
        ("canary_verdict", "canary", env.canary),
        ("alias_moved", "canary", env.production),
    ]
    assert notes[0].details["verdict"] == "rollback" and notes[0].details["mean_canary"] < 0.4
    # Nothing is live any more: later ticks stay idle and write nothing.
    assert canary_state(env.store, CONFIG) == CanaryState(env.production, None, 0.1)


def test_clearly_better_canary_is_promoted(env: Env) -> None:
    env.outcomes("production", env.production, reward=0.40, seed=3)
    env.outcomes("canary", env.canary, reward=0.60, seed=4)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        decision = job.tick()
    finally:
        job.close()
    assert decision is not None and decision.action == "promote"
    assert env.store.resolve("production").id == env.canary
    assert env.store.get(env.canary).status == "ready"
    history = env.store.history("production")
    assert history[0].actor == "canary" and history[0].from_version == env.production
    verdict = env.store.audit(action="canary_verdict", version=env.canary)[0]
    assert verdict.details["passed"] is True and verdict.details["effect"] > 0.1
    assert verdict.details["outcome"] == "promoted" and verdict.details["effect_low"] > 0
    notes = env.announcements()
    assert [(n.kind, n.alias, n.version) for n in notes] == [
        ("canary_verdict", "canary", env.canary),
        ("alias_moved", "production", env.canary),
    ]
    status = summary(env.store, CONFIG)
    assert status["production"] == status["canary"] == env.canary and not status["live"]
    assert status["verdicts"][0]["verdict"] == "promote"


def test_reward_hacking_canary_is_rejected_by_the_relevance_guard(env: Env) -> None:
    """More clicks (a higher reward) bought with less relevant products: rolled back, not promoted."""
    env.outcomes("production", env.production, reward=0.40, relevance=0.60, seed=5)
    env.outcomes("canary", env.canary, reward=0.55, relevance=0.45, seed=6)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        decision = job.tick()
    finally:
        job.close()
    assert decision is not None and decision.action == "rollback"
    assert decision.analysis is not None and decision.analysis.effect > 0.1, "the reward alone says promote"
    assert "relevance guard" in decision.reason
    assert env.store.resolve("production").id == env.production
    assert env.store.resolve("canary").id == env.production
    assert env.store.get(env.canary).status == "rejected"
    verdict = env.store.audit(action="canary_verdict", version=env.canary)[0]
    ratio = verdict.details["relevance_canary"] / verdict.details["relevance_production"]
    assert ratio == pytest.approx(0.75, abs=0.03) and verdict.details["worse_by"] == "relevance"


def test_inconclusive_windows_step_the_share_and_survive_a_restart(env: Env) -> None:
    env.outcomes("production", env.production, reward=0.50, seed=7)
    env.outcomes("canary", env.canary, reward=0.50, seed=8)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        first = job.tick()
        second = job.tick()
    finally:
        job.close()
    assert first is not None and (first.action, first.share) == ("continue", 0.25)
    assert second is not None and (second.action, second.share) == ("continue", 0.5)
    assert canary_share(env.store, env.canary, CONFIG) == 0.5
    # A new job (a restart) reads the window back from the topic and the state from the audit log.
    restarted = CanaryJob(env.settings, env.store, env.producer)
    try:
        third = restarted.tick()
    finally:
        restarted.close()
    assert third is not None and third.details["analyses"] == 3
    assert third.details["n_canary"] == 60, "the restarted job re-read the window from the topic"
    verdicts = env.store.audit(action="canary_verdict", version=env.canary)
    assert [v.details["share"] for v in verdicts] == [0.5, 0.5, 0.25]
    assert all(v.details["passed"] is None for v in verdicts), "no decision yet"
    assert env.store.resolve("canary").id == env.canary, "nothing moved"
    shares = [n.details["share"] for n in env.announcements() if n.kind == "canary_verdict"]
    assert shares == [0.25, 0.5, 0.5]


def test_the_reward_tests_spread_is_fixed_by_the_first_analysis_and_survives_a_restart(env: Env) -> None:
    """``design_lift`` of the mean reward at the first tested analysis, recorded with it; a restarted job
    reads it back from the audit log instead of re-estimating it from the evidence it has by then."""
    start = datetime.now(UTC)
    env.outcomes("production", env.production, reward=0.50, seed=21, start=start)
    env.outcomes("canary", env.canary, reward=0.50, seed=22, start=start)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        first = job.tick()
    finally:
        job.close()
    assert first is not None and first.action == "continue"
    tau = first.details["reward_tau"]
    assert tau == pytest.approx(
        CONFIG.design_lift * (first.details["mean_production"] + first.details["mean_canary"]) / 2
    )
    assert canary_state(env.store, CONFIG).reward_tau == tau  # type: ignore[union-attr]
    # More evidence at a lower level: re-estimating the spread now would give about 0.035, not 0.05.
    later = start + timedelta(seconds=60)
    env.outcomes("production", env.production, reward=0.20, seed=23, start=later)
    env.outcomes("canary", env.canary, reward=0.20, seed=24, start=later)
    restarted = CanaryJob(env.settings, env.store, env.producer)
    try:
        second = restarted.tick()
    finally:
        restarted.close()
    assert second is not None and second.details["n_canary"] == 120, "the restart re-read all the evidence"
    pooled_now = (second.details["mean_production"] + second.details["mean_canary"]) / 2
    assert abs(CONFIG.design_lift * pooled_now - tau) > 0.01
    assert second.details["reward_tau"] == tau


def test_kl_guard_rolls_back_a_canary_far_from_production(env: Env) -> None:
    env.outcomes("production", env.production, reward=0.40, seed=9)
    env.outcomes("canary", env.canary, reward=0.60, seed=10, kl=CONFIG.max_kl + 3)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        decision = job.tick()
    finally:
        job.close()
    assert decision is not None and decision.action == "rollback" and "KL guard" in decision.reason
    assert env.store.resolve("canary").id == env.production


def test_inconclusive_canary_keeps_production_and_archives_the_candidate(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As good as production, and the budget runs out: archived (not rejected), shown as inconclusive."""
    from typer.testing import CliRunner

    from qrloop.cli.main import app
    from qrloop.settings import get_settings

    env.outcomes("production", env.production, reward=0.50, seed=15)
    env.outcomes("canary", env.canary, reward=0.50, seed=16)
    short = env.settings.model_copy(update={"canary": CONFIG.model_copy(update={"max_queries": 60})})
    job = CanaryJob(short, env.store, env.producer)
    try:
        decision = job.tick()
    finally:
        job.close()
    assert decision is not None and decision.action == "inconclusive", decision
    assert env.store.resolve("production").id == env.production
    assert env.store.resolve("canary").id == env.production
    assert env.store.get(env.canary).status == "archived", "not shown worse, so not rejected"
    verdict = env.store.audit(action="canary_verdict", version=env.canary)[0]
    assert verdict.details["verdict"] == "inconclusive" and verdict.details["passed"] is None
    assert verdict.details["outcome"] == "inconclusive"
    assert env.store.audit(action="archive", version=env.canary)[0].actor == "canary"
    assert env.store.audit(action="reject", version=env.canary) == []
    notes = env.announcements()
    assert [(n.kind, n.alias, n.version) for n in notes] == [
        ("canary_verdict", "canary", env.canary),
        ("alias_moved", "canary", env.production),
    ]
    monkeypatch.setenv("QRLOOP_DATABASE_URL", env.settings.db_url)
    monkeypatch.setenv("QRLOOP_BLOB_DIR", str(env.settings.blob_dir))
    get_settings.cache_clear()
    try:
        shown = CliRunner().invoke(app, ["canary", "status"], env={"COLUMNS": "250"})
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0, shown.output
    assert "inconclusive" in shown.stdout and "rolled back" not in shown.stdout


def test_a_pinned_production_is_not_promoted_over(env: Env) -> None:
    """An operator pinned production: the canary's promotion is refused by the store, nothing moves."""
    env.store.pin("production", reason="incident 42", actor="cli")
    env.outcomes("production", env.production, reward=0.40, seed=17)
    env.outcomes("canary", env.canary, reward=0.60, seed=18)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        decision = job.tick()
    finally:
        job.close()
    assert decision is not None and decision.action == "promote"
    assert env.store.resolve("production").id == env.production, "the pin holds"
    assert env.store.audit(action="canary_verdict") == [], "a refused verdict writes nothing"
    assert env.announcements() == []


def test_verdict_on_a_canary_replaced_meanwhile_changes_nothing(env: Env) -> None:
    """The learner moved the canary to a newer version during the analysis: the old verdict is stale."""
    env.outcomes("production", env.production, reward=0.50, seed=11)
    env.outcomes("canary", env.canary, reward=0.20, seed=12)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        job.poll()
        state = canary_state(env.store, CONFIG)
        assert state is not None
        decision = decide(state, *job.outcomes.since_canary(env.production, env.canary), CONFIG)
        env.store.set_alias("canary", env.spare, actor="learner")
        job.act(state, decision)
    finally:
        job.close()
    assert decision.action == "rollback"
    assert env.store.resolve("canary").id == env.spare
    assert env.store.get(env.canary).status == "ready", "a stale verdict rejects nothing"
    assert env.store.audit(action="canary_verdict") == []
    assert env.announcements() == []


def test_canary_status_shows_aliases_share_and_the_last_analysis(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from qrloop.cli.main import app
    from qrloop.settings import get_settings

    env.outcomes("production", env.production, reward=0.50, seed=13)
    env.outcomes("canary", env.canary, reward=0.50, seed=14)
    job = CanaryJob(env.settings, env.store, env.producer)
    try:
        job.tick()
    finally:
        job.close()
    monkeypatch.setenv("QRLOOP_DATABASE_URL", env.settings.db_url)
    monkeypatch.setenv("QRLOOP_BLOB_DIR", str(env.settings.blob_dir))
    monkeypatch.setenv("QRLOOP_CANARY__SHARE_STEPS", "[0.1, 0.25, 0.5]")
    get_settings.cache_clear()
    try:
        shown = CliRunner().invoke(app, ["canary", "status"], env={"COLUMNS": "200"})
        narrow = CliRunner().invoke(app, ["canary", "status"], env={"COLUMNS": "80"})
        as_json = CliRunner().invoke(app, ["canary", "status", "--json"])
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0, shown.output
    assert f"production → {env.production}" in shown.stdout and f"canary → {env.canary}" in shown.stdout
    assert "live at 25% of shoppers" in shown.stdout and "continue" in shown.stdout
    assert "not yet conclusive" in shown.stdout
    assert narrow.exit_code == 0 and max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout
    assert as_json.exit_code == 0, as_json.output
    assert '"share": 0.25' in as_json.stdout and '"n_canary": 60' in as_json.stdout
