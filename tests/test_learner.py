"""The learner on the real broker and both databases: versions with lineage and offsets, skipped duplicates,
and exactly-once training across kill -9 at arbitrary moments (between steps, mid-step, mid-publish)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.ledger import SqlTrainingRecord
from learner.worker import LEARNER_TAG, build, resume_state
from policy_store import db
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import pair, publish_pairs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()))


@pytest.fixture
def learner_settings(settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dir: Path) -> Settings:
    isolated = isolate(settings, unique_topic, None)  # the store stays the db_url fixture's
    dpo = isolated.dpo.model_copy(update={"learning_rate": 1e-4})
    configured = isolated.model_copy(update={"dpo": dpo})
    ensure_topics(configured)
    db.upgrade(configured.db_url)
    store = open_store(configured)
    start = store.publish(tiny_dir, base_model="tiny-llama", actor="test")
    store.set_alias("production", start.id, reason="start", actor="test")
    store.close()
    return configured


def ledger_counts(settings: Settings) -> dict[str, int]:
    import sqlalchemy as sa

    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SqlTrainingRecord.pair_id, sa.func.count()).group_by(SqlTrainingRecord.pair_id)
        ).all()
    engine.dispose()
    return {pid: n for pid, n in rows}


def test_versions_lineage_offsets_and_duplicates(learner_settings: Settings) -> None:
    settings = learner_settings
    pairs = [pair(n) for n in range(48)]
    # The aggregator re-emits pair 3 (at-least-once): same id, trained once. A malformed message is skipped.
    publish_pairs(settings, [*pairs[:20], pairs[3], *pairs[20:]], extra=[b"{broken"])
    learner = build(settings)
    versions = []
    deadline = time.monotonic() + 120
    while len(versions) < 3 and time.monotonic() < deadline:
        published = learner.run_once(timeout_ms=500)
        if published:
            versions.append(published)
    learner.consumer.close()
    store = open_store(settings)
    chain = [store.get(v) for v in versions]
    assert [v.parent_id for v in chain] == [1, versions[0], versions[1]], "each version's parent is the last"
    assert [v.train_steps for v in chain] == [1, 2, 3]
    assert all(
        v.tags[LEARNER_TAG] == settings.dpo.learner_name and v.tags["reference_version"] == 1 for v in chain
    )
    topic_key = f"{settings.topics.preference_pairs}:0"
    assert chain[0].offsets[topic_key] == 16
    assert chain[1].offsets[topic_key] == 33, "the duplicate was consumed and skipped inside the second batch"
    assert store.resolve("production").id == versions[-1]
    counts = ledger_counts(settings)
    assert len(counts) == 48 and set(counts.values()) == {1}
    assert set(counts) == {p.pair_id for p in pairs}
    store.close()


def test_exactly_once_across_kill_minus_nine(learner_settings: Settings, tmp_path: Path) -> None:
    settings = learner_settings
    pairs = [pair(n) for n in range(96)]
    publish_pairs(settings, pairs)
    env = run_env(settings) | {"QRLOOP_DPO__LEARNING_RATE": "1e-4"}
    rng = random.Random(7)
    kills = 0
    log = (tmp_path / "learner.log").open("wb")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "qrloop", "learn"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def trained() -> int:
        return sum(ledger_counts(settings).values())

    process = start()
    deadline = time.monotonic() + 240
    try:
        while trained() < 96 and time.monotonic() < deadline:
            if kills < 4:
                # Let it get into a step or a publish (model load takes ~1 s), then pull the plug.
                time.sleep(rng.uniform(1.5, 4.0))
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                process = start()
            else:
                time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    counts = ledger_counts(settings)
    assert kills == 4
    assert set(counts) == {p.pair_id for p in pairs}, (tmp_path / "learner.log").read_text()[-3000:]
    assert set(counts.values()) == {1}, "no pair trained twice"
    store = open_store(settings)
    mine = sorted(
        (v for v in store.list() if v.tags.get(LEARNER_TAG) == settings.dpo.learner_name), key=lambda v: v.id
    )
    assert [v.train_steps for v in mine] == list(range(1, 7)), "six steps of sixteen, none repeated or lost"
    assert [v.parent_id for v in mine[1:]] == [v.id for v in mine[:-1]]
    store.close()


def pair_lags(settings: Settings) -> dict[str, float]:
    """``qrloop_consumer_lag{role="learner"}`` per partition of the pair topic, as /metrics shows it."""
    from prometheus_client import REGISTRY

    return {
        sample.labels["partition"]: sample.value
        for family in REGISTRY.collect()
        if family.name == "qrloop_consumer_lag"
        for sample in family.samples
        if sample.labels["role"] == "learner" and sample.labels["topic"] == settings.topics.preference_pairs
    }


def test_consumer_lag_counts_waiting_pairs_down_to_zero(learner_settings: Settings) -> None:
    settings = learner_settings.model_copy(
        update={"dpo": learner_settings.dpo.model_copy(update={"batch_size": 4})}
    )
    publish_pairs(settings, [pair(n) for n in range(12)])
    learner = build(settings)
    lags: list[float] = []
    versions = []
    deadline = time.monotonic() + 120
    while len(versions) < 3 and time.monotonic() < deadline:
        published = learner.run_once(timeout_ms=500)
        lags.append(sum(pair_lags(settings).values()))
        if published:
            versions.append(published)
    for _ in range(3):  # a few more polls: a fetch after the last record brings the end offset up to date
        learner.run_once(timeout_ms=300)
    lags.append(sum(pair_lags(settings).values()))
    learner.consumer.close()
    assert len(versions) == 3, "12 pairs in batches of 4"
    assert lags[0] > 0 and max(lags) <= 12, lags  # the first poll takes one batch; the rest wait
    assert lags[-1] == 0, lags
    assert set(pair_lags(settings)) == {str(p) for p in range(settings.topics.pair_partitions)}


def test_a_rejected_lineage_is_abandoned_for_the_start_alias(learner_settings: Settings) -> None:
    # The canary flow: the learner publishes candidates to 'canary' and starts from 'production'.
    settings = learner_settings.model_copy(
        update={"dpo": learner_settings.dpo.model_copy(update={"alias": "canary"})}
    )
    publish_pairs(settings, [pair(n) for n in range(48)])
    learner = build(settings)

    def next_version() -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            published = learner.run_once(timeout_ms=500)
            if published:
                return published
        raise AssertionError("no version within 120 s")

    first = next_version()
    store = open_store(settings)
    # What the canary job's rollback does: canary back to production's version, the candidate rejected.
    store.set_alias("canary", 1, reason="rollback", actor="test")
    store.reject(first, reason="worse than production", actor="test")

    second = next_version()
    rebased = store.get(second)
    assert rebased.parent_id == 1 and rebased.tags["reference_version"] == 1, "trained from production again"
    assert rebased.train_steps == 1
    topic_key = f"{settings.topics.preference_pairs}:0"
    assert rebased.offsets[topic_key] == 32, "the rejected version's pairs are not replayed"
    learner.consumer.close()

    # A restarted learner whose latest version was rejected rebases the same way, from the stored offsets.
    store.set_alias("canary", 1, reason="rollback", actor="test")
    store.reject(second, reason="worse again", actor="test")
    state = resume_state(store, settings)
    assert (state.version, state.reference_version, state.offsets[topic_key]) == (1, 1, 32)
    store.close()
