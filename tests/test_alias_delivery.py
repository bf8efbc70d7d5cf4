"""Every alias move reaches the running rewriter, announced or not: the store is the authority.

Real broker, both databases, tiny real models. The rewriter's followers reconcile with the store on start, on
announcements and every ``rewriter.reconcile_s``; announcements only make them react sooner.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from learner.worker import build
from policy_store import PolicyStore, db
from qrloop.canary_job import ACTOR
from qrloop.events import PolicyAnnouncement, decode, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.serving import AnnouncementFollower, ArmedRewriter, ArmsFollower, Rewriter, load_version
from qrloop.settings import CanarySettings, RewriterSettings, Settings
from qrloop.topics import ensure_topics
from tests.helpers import pair, publish_pairs

RECONCILE_S = 0.5


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tokenizer_dir = require_policy(Settings())
    return [build_tiny_policy(tmp_path_factory.mktemp(f"d{i}"), tokenizer_dir, seed=i) for i in range(3)]


@dataclass
class Loop:
    settings: Settings
    store: PolicyStore
    versions: list[int]


@pytest.fixture
def loop(settings: Settings, kafka_bootstrap: str, unique_topic: str, weights: list[Path]) -> Iterator[Loop]:
    topics = settings.topics.model_copy(
        update={
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "query_outcomes": f"{unique_topic}.o",
        }
    )
    configured = settings.model_copy(
        update={
            "topics": topics,
            "rewriter": RewriterSettings(max_new_tokens=4, reconcile_s=RECONCILE_S),
            "dpo": settings.dpo.model_copy(update={"learner_name": unique_topic, "learning_rate": 1e-4}),
            "canary": CanarySettings(share_steps=[0.2, 0.4]),
        }
    )
    ensure_topics(configured, {topics.preference_pairs: 1, topics.policy_versions: 1, topics.dead_letter: 1})
    db.upgrade(configured.db_url)
    store = open_store(configured)
    versions = [store.publish(weights[0], base_model="tiny-llama").id]
    for w in weights[1:]:
        versions.append(store.publish(w, base_model="tiny-llama", parent=versions[-1]).id)
    store.set_alias("production", versions[0], actor="test")
    yield Loop(configured, store, versions)
    store.close()


def search(text: str) -> list[str]:
    return [f"p{len(w)}" for w in text.split()][:10]


def rewriter_on(store: PolicyStore, version: int) -> Rewriter:
    return Rewriter(
        load_version(store.load_dir(version), version), search, RewriterSettings(max_new_tokens=4)
    )


def seconds_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


def announcements(settings: Settings) -> list[PolicyAnnouncement]:
    consumer = KafkaConsumer(
        settings.topics.policy_versions,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1500,
    )
    try:
        return [decode(PolicyAnnouncement, m.value) for m in consumer]
    finally:
        consumer.close()


def test_operator_rollback_with_serve_and_learn_running_is_served_and_survives_the_next_step(
    loop: Loop,
) -> None:
    """The learner publishes and moves production; the operator rolls back with --pin (no announcement);
    the rewriter serves the rolled-back version, and the learner's next publish leaves production alone."""
    settings, store, v1 = loop.settings, loop.store, loop.versions[0]
    rewriter = rewriter_on(store, v1)
    follower = AnnouncementFollower(settings, rewriter, "production", store).start()
    learner = build(settings)
    try:
        publish_pairs(settings, [pair(n) for n in range(16)])
        first = None
        deadline = time.monotonic() + 120
        while first is None and time.monotonic() < deadline:
            first = learner.run_once(timeout_ms=500)
        assert first is not None and store.resolve("production").id == first
        seconds_until(lambda: rewriter.version == first)

        store.rollback("production", to=v1, reason="bad rewrites", actor="cli", pin=True)
        served_after = seconds_until(lambda: rewriter.version == v1)
        print(f"rolled-back version served after {served_after:.2f} s (reconcile every {RECONCILE_S} s)")
        assert rewriter.serve("drill", shopper_id="s", session_id="x").policy_version == v1

        publish_pairs(settings, [pair(n) for n in range(16, 32)])
        second = None
        deadline = time.monotonic() + 120
        while second is None and time.monotonic() < deadline:
            second = learner.run_once(timeout_ms=500)
        assert second is not None and store.get(second).parent_id == first, "published on its own lineage"
        assert store.resolve("production").id == v1, "the pin held"
        time.sleep(3 * RECONCILE_S)
        assert rewriter.version == v1
        moved = [n.version for n in announcements(settings) if n.kind == "alias_moved"]
        assert moved == [first], "no announcement of a move that did not happen"
        assert [e.action for e in store.history("production")[:2]] == ["pin", "rollback"]
    finally:
        learner.consumer.close()
        learner.producer.close()
        follower.stop()


def test_unannounced_moves_are_served_within_the_reconcile_interval(loop: Loop) -> None:
    """Ten operator moves (set-alias / rollback only write the database): each one is served."""
    store, (v1, v2, _) = loop.store, loop.versions
    rewriter = rewriter_on(store, v1)
    follower = AnnouncementFollower(loop.settings, rewriter, "production", store).start()
    delays = []
    try:
        for i in range(10):
            target = v2 if i % 2 == 0 else v1
            if target == v2:
                store.set_alias("production", v2, actor="cli")
            else:
                store.rollback("production", actor="cli")

            def served(t: int = target) -> bool:
                return rewriter.version == t

            delays.append(seconds_until(served))
    finally:
        follower.stop()
    print(f"unannounced moves served after median {statistics.median(delays):.2f} s, max {max(delays):.2f} s")
    assert [v for v, _ in follower.swaps] == [v2, v1] * 5


def test_a_crash_between_commit_and_announcement_still_reaches_the_rewriter(loop: Loop) -> None:
    """A process commits an alias move and dies before announcing it (os._exit): the running follower
    serves it, and so does a follower that was down at the time and starts later."""
    settings, store, (v1, v2, v3) = loop.settings, loop.store, loop.versions
    running = rewriter_on(store, v1)
    follower = AnnouncementFollower(settings, running, "production", store).start()
    crash = (
        "import os, sys; from policy_store import PolicyStore; "
        "s = PolicyStore(sys.argv[1], sys.argv[2]); "
        "s.set_alias('production', int(sys.argv[3]), actor='learner'); os._exit(9)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        died = subprocess.run(
            [sys.executable, "-c", crash, settings.db_url, str(settings.blob_dir), str(v2)], env=env
        )
        assert died.returncode == 9 and store.resolve("production").id == v2
        seconds_until(lambda: running.version == v2)
        assert announcements(settings) == [], "nothing was announced"
    finally:
        follower.stop()
    late = rewriter_on(store, v1)
    late_follower = AnnouncementFollower(settings, late, "production", store).start()
    try:
        seconds_until(lambda: late.version == v2)
        # A stray announcement of a version the alias does not hold changes nothing: the store decides.
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        note = PolicyAnnouncement(kind="alias_moved", version=v3, alias="production", previous_version=v2)
        producer.send(settings.topics.policy_versions, key=note.kafka_key(), value=encode(note))
        producer.flush()
        producer.close()
        time.sleep(4 * RECONCILE_S)
        assert late.version == v2
    finally:
        late_follower.stop()


def test_canary_verdicts_and_share_steps_reach_both_arms_without_announcements(loop: Loop) -> None:
    settings, store, (v1, v2, _) = loop.settings, loop.store, loop.versions
    store.set_alias("canary", v2, actor="learner")
    armed = ArmedRewriter(rewriter_on(store, v1), 0.2)
    follower = ArmsFollower(settings, armed, store).start()
    try:
        seconds_until(lambda: armed.canary_version == v2)
        store.record_canary_verdict(
            v2, passed=False, details={"verdict": "continue", "share": 0.4}, alias="canary", actor=ACTOR
        )
        seconds_until(lambda: armed.share == 0.4)
        store.conclude_canary(v2, "rollback", production_version=v1, actor=ACTOR)
        seconds_until(lambda: armed.canary_version is None)
        assert armed.version == v1
    finally:
        follower.stop()
