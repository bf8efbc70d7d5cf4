"""The rewriter's arms: a stable share of shoppers served by the canary, the arm and version on every event,
the KL guard's reference log-probs, and both aliases followed as the canary job moves them in the store."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer

from policy_store import db
from qrloop.canary_job import CanaryJob
from qrloop.events import PolicyAnnouncement, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.serving import ArmedRewriter, ArmsFollower, Rewriter, assign_arm, load_version, start_arms
from qrloop.settings import CanarySettings, RewriterSettings, Settings
from qrloop.topics import ensure_topics
from streams import attribution
from tests.helpers import clicked_state

CONFIG = CanarySettings(min_samples=20, share_steps=[0.3, 0.6])


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tokenizer_dir = require_policy(Settings())
    return [build_tiny_policy(tmp_path_factory.mktemp(f"t{i}"), tokenizer_dir, seed=i) for i in range(3)]


def fake_search(text: str) -> list[str]:
    return [f"p{abs(hash(w)) % 50}" for w in text.split()][:10]


def rewriter(path: Path, version: int) -> Rewriter:
    return Rewriter(load_version(path, version), fake_search, RewriterSettings(max_new_tokens=4))


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_arm_assignment_is_stable_proportional_and_monotone_in_the_share() -> None:
    shoppers = [f"shopper-{i}" for i in range(4000)]
    at_10 = {s for s in shoppers if assign_arm(s, "x", 7, 0.10) == "canary"}
    at_25 = {s for s in shoppers if assign_arm(s, "x", 7, 0.25) == "canary"}
    assert abs(len(at_10) / 4000 - 0.10) < 0.02 and abs(len(at_25) / 4000 - 0.25) < 0.03
    assert at_10 <= at_25, "stepping the share up keeps every canary shopper in the canary"
    assert at_10 == {s for s in shoppers if assign_arm(s, "other-session", 7, 0.10) == "canary"}
    assert at_10 != {s for s in shoppers if assign_arm(s, "x", 8, 0.10) == "canary"}, "fresh per version"
    anonymous = {assign_arm("anonymous", f"session-{i}", 7, 0.5) for i in range(50)}
    assert anonymous == {"production", "canary"}, "anonymous shoppers are split by session"


def test_rewriter_splits_traffic_by_share_and_records_arm_version_and_reference(
    tiny_dirs: list[Path],
) -> None:
    armed = ArmedRewriter(rewriter(tiny_dirs[0], 1), share=0.3)
    torch.manual_seed(0)
    before = armed.serve("drill bit", shopper_id="s0", session_id="x")
    assert (before.arm, before.policy_version) == ("production", 1), "no canary alias: production only"

    armed.set_canary(load_version(tiny_dirs[1], 2), share=0.3)
    shoppers = [f"s{i}" for i in range(60)]
    events = [armed.serve("drill bit", shopper_id=s, session_id="x") for s in shoppers]
    arms = Counter(e.arm for e in events)
    assert [e.arm for e in events] == [assign_arm(s, "x", 2, 0.3) for s in shoppers]
    assert 8 <= arms["canary"] <= 30, arms
    for event in events:
        assert event.policy_version == (2 if event.arm == "canary" else 1)
        references = [r.reference_logprob for r in event.rewrites]
        if event.arm == "canary":  # log π_production of the canary's tokens: a different model's number
            assert all(ref is not None and ref < 0 for ref in references)
            assert any(abs(r.logprob - (r.reference_logprob or 0)) > 1e-3 for r in event.rewrites)
        else:
            assert references == [None, None]

    # The same weights as canary (a re-published version): log-ratio 0, so the reference pass is exact.
    armed.set_canary(load_version(tiny_dirs[0], 3), share=1.0)
    same = armed.serve("angle bracket", shopper_id="s1", session_id="x")
    assert same.arm == "canary" and same.policy_version == 3
    for r in same.rewrites:
        assert r.reference_logprob == pytest.approx(r.logprob, abs=1e-3)

    # When the canary holds production's version, it is not a canary: everyone gets production.
    armed.set_canary(armed.production.policy, share=1.0)
    assert armed.canary_version is None
    assert armed.serve("drill", shopper_id="s1", session_id="x").arm == "production"


def test_job_verdicts_move_real_aliases_and_the_rewriter_follows(
    settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dirs: list[Path]
) -> None:
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
    v1 = store.publish(tiny_dirs[0], base_model="tiny").id
    v2 = store.publish(tiny_dirs[1], base_model="tiny", parent=v1).id
    v3 = store.publish(tiny_dirs[2], base_model="tiny", parent=v2).id
    store.set_alias("production", v1)
    store.set_alias("canary", v2, actor="learner")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

    armed = start_arms(configured, rewriter(tiny_dirs[0], v1), store)
    follower = ArmsFollower(configured, armed, store).start()
    job = CanaryJob(configured, store, producer)
    relevance = lambda _q, products: [0.5] * len(products)  # noqa: E731
    # The paper's scalar: clicks anywhere in a list count, so fewer clicks on the canary's lists lower its
    # reward whatever the tiny policy's rewrites retrieve (the canary compares whichever scalar is set).
    # Without diversity, which differs between the tiny policies' rewrites, equal clicks score alike: with
    # it, a canary clicked like production was once rolled back as "worse by -0.011" (CI, PostgreSQL side).
    weights = settings.rewards.model_copy(
        update={"ranking": "paper", "relevant_above": 0.0, "diversity": 0.0}
    )
    try:
        assert armed.arms() == {"production_version": v1, "canary_version": v2, "share": 0.3}
        time.sleep(1.0)  # the follower starts at the end of the topic

        def serve_and_score(n: int, canary_clicks: int, production_clicks: int) -> Counter[str]:
            """Serve real queries; the shoppers click less on the canary's lists (worse by construction)."""
            arms: Counter[str] = Counter()
            for i in range(n):
                event = armed.serve("drill bit", shopper_id=f"shopper-{i}", session_id="x")
                arms[event.arm] += 1
                clicks = canary_clicks if event.arm == "canary" else production_clicks
                state = clicked_state(event, clicks)
                outcome = attribution.outcome(state, attribution.score(state, relevance, weights))
                assert (outcome.arm, outcome.policy_version) == (event.arm, event.policy_version)
                producer.send(topics.query_outcomes, key=outcome.kafka_key(), value=encode(outcome))
            producer.flush()
            return arms

        # 1. Too few canary samples: continue; a healthy but inconclusive window steps the share up...
        served = serve_and_score(80, canary_clicks=1, production_clicks=1)
        assert 10 <= served["canary"] <= 45, served
        first = job.tick()
        assert first is not None and first.action == "continue"
        if first.analysis is not None and first.analysis.tested:
            assert wait_for(lambda: armed.share == 0.6), "the rewriter follows the share step"

        # 2. ...then the canary's lists get fewer clicks: rolled back, and the rewriter stops serving it.
        serve_and_score(120, canary_clicks=0, production_clicks=3)
        verdict = job.tick()
        assert verdict is not None and verdict.action == "rollback", verdict
        assert store.resolve("canary").id == v1 and store.get(v2).status == "rejected"
        assert wait_for(lambda: armed.canary_version is None)
        assert {armed.serve("drill", shopper_id=f"s{i}", session_id="x").arm for i in range(10)} == {
            "production"
        }

        # 3. The learner publishes a new candidate to the canary alias: served again at the first step.
        store.set_alias("canary", v3, actor="learner")
        note = PolicyAnnouncement(kind="alias_moved", version=v3, alias="canary", previous_version=v1)
        producer.send(topics.policy_versions, key=note.kafka_key(), value=encode(note))
        producer.flush()
        assert wait_for(lambda: armed.canary_version == v3)
        assert armed.share == 0.3

        # 4. This one earns more clicks than production: promoted, and production now serves it.
        serve_and_score(200, canary_clicks=3, production_clicks=0)
        promoted = job.tick()
        assert promoted is not None and promoted.action == "promote", promoted
        assert store.resolve("production").id == v3
        assert wait_for(lambda: armed.version == v3)
        assert armed.canary_version is None
        event = armed.serve("drill", shopper_id="s1", session_id="x")
        assert (event.arm, event.policy_version) == ("production", v3)
        assert [v for v, _ in follower.swaps] == [v1, v3, v3], "canary back, new canary, promotion"
    finally:
        follower.stop()
        job.close()
        producer.close()
        store.close()
