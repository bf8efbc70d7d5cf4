"""Data-parallel DPO: `qrloop learn --nproc 2` (two gloo ranks) against the single-process step on the same
16 pairs, on the real broker and store. The tiny random policy keeps it to seconds of compute."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner.dpo import DPOLearnerCore
from learner.worker import LEARNER_TAG
from policy_store import db
from qrloop.models import build_tiny_policy, load_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import learner_env, ledger_counts, pair, publish_pairs

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

LEARNING_RATE = 1e-3  # large enough that one step moves weights far beyond the 1e-5 tolerance


@pytest.fixture
def dp_settings(settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path) -> Settings:
    topics = settings.topics.model_copy(
        update={
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "query_events": f"{unique_topic}.q",
            "interactions": f"{unique_topic}.i",
            "pair_partitions": 3,
        }
    )
    dpo = settings.dpo.model_copy(update={"learner_name": unique_topic, "learning_rate": LEARNING_RATE})
    configured = settings.model_copy(update={"topics": topics, "dpo": dpo})
    ensure_topics(configured)
    db.upgrade(configured.db_url)
    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(Settings()))
    with open_store(configured) as store:
        start = store.publish(tiny, base_model="tiny-llama", actor="test")
        store.set_alias("production", start.id, reason="start", actor="test")
    return configured


def lineage_versions(settings: Settings) -> list[int]:
    with open_store(settings) as store:
        return sorted(v.id for v in store.list() if v.tags.get(LEARNER_TAG) == settings.dpo.learner_name)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0])
def test_two_gloo_ranks_step_like_one_process(
    dp_settings: Settings, tmp_path: Path, rpo_alpha: float
) -> None:
    """With RPO's term too: it is a mean over chosen *tokens*, which the two ranks' shares hold unequally."""
    settings = dp_settings.model_copy(
        update={"dpo": dp_settings.dpo.model_copy(update={"rpo_alpha": rpo_alpha})}
    )
    pairs = [pair(n) for n in range(16)]
    publish_pairs(settings, pairs)

    log_path = tmp_path / "learner.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "qrloop", "learn", "--nproc", "2"],
            cwd=REPO_ROOT,
            env=learner_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while not lineage_versions(settings) and time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text()[-3000:]
                time.sleep(1)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert "data-parallel learner: 2 ranks on gloo" in output, output[-3000:]
    assert process.returncode == 0, output[-3000:]
    [version_id] = lineage_versions(settings)

    # The same step in this process, on the same 16 pairs (their order on rank 0 follows the partitions'
    # interleaving; the batch mean does not depend on it beyond float summation order).
    with open_store(settings) as store:
        single = DPOLearnerCore.from_versions(settings, store, policy_version=1, reference_version=1)
        start = {k: v.clone() for k, v in single.policy.state_dict().items()}
        stats = single.step([(p.prompt, p.chosen, p.rejected) for p in pairs])
        published = store.get(version_id)
        weights, _ = load_policy(store.load_dir(version_id))

    expected = single.policy.state_dict()
    got = weights.state_dict()
    assert got.keys() == expected.keys()
    moved = max(float((expected[k] - start[k]).abs().max()) for k in expected)
    assert moved > 1e-4, "one step moved the weights well past the tolerance"
    diff = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert diff < 1e-5, f"data-parallel weights differ by {diff}"

    # The published version is the one a single learner would have published: same parent, step, offsets,
    # ledger, and the full batch's statistics (loss scaled as the mean over all 16 pairs, not per rank).
    assert (published.parent_id, published.train_steps) == (1, 1)
    assert sum(published.offsets.values()) == 16
    assert set(ledger_counts(settings)) == {p.pair_id for p in pairs}
    for name in ("loss", "margin", "grad_norm", "nll"):
        assert published.metrics[name] == pytest.approx(getattr(stats, name), rel=1e-5, abs=1e-6), name
    # Not the accuracy: it counts margins > 0, and at the first step policy = reference, so every margin is
    # float noise (~1e-7) whose sign depends on how the reference terms were batched (per pair as they arrive
    # in the single process, per rank share in the data-parallel step).
    assert published.metrics["tokens"] == stats.tokens
