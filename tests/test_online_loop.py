"""The online loop end to end on the real broker: rewriter, shoppers, Faust aggregator and learner as separate
processes (the demo's runner), with a tiny random policy of SmolLM2's architecture and tokenizer for speed.

Batch size 8, a zero tie margin and the paper's scalar keep four DPO steps within 64 queries: a random
policy's two rewrites often retrieve identical lists or add nothing beyond the original query's, which the
gain (rightly) scores as ties; this test is about the loop's plumbing, not about what the gain teaches
(tests/test_rewards.py and benchmarks/bench_learning.py are).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from learner.dpo import sequence_logprobs, tokenize_pairs
from learner.ledger import pairs_of_version
from learner.offline.q2q import known_corrections
from qrloop.cli.demo import DEMO_LORA_R, run_demo
from qrloop.data import normalise_query
from qrloop.models import build_tiny_policy, load_stored_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import Settings
from tests.helpers import PAPER_SCALAR

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def test_sixty_four_queries_train_and_serve_new_versions(
    base_settings: Settings, kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRLOOP_DPO__BATCH_SIZE", "8")
    monkeypatch.setenv("QRLOOP_DPO__LEARNING_RATE", "1e-3")  # LoRA, as the demo trains
    monkeypatch.setenv("QRLOOP_REWARDS__MARGIN", "0")
    for name, value in PAPER_SCALAR.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QRLOOP_BLOB_DIR", str(tmp_path / "blobs"))
    settings = Settings()
    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings))

    progress = run_demo(
        settings, 64, Console(file=(tmp_path / "demo.txt").open("w")), start_dir=tiny, lora_r=DEMO_LORA_R
    )

    assert progress.queries == 64
    assert progress.run is not None
    store = open_store(progress.run.settings)
    versions = sorted(store.list(), key=lambda v: v.id)
    trained = [v for v in versions if v.train_steps > 0]
    assert len(trained) >= 4, (
        f"{progress.pairs} pairs gave {len(trained)} versions; logs in {progress.run.run_dir}"
    )
    assert [v.parent_id for v in trained] == [v.id for v in versions[: len(trained)]], "a lineage, in order"
    # One offset per pair partition; together they count the pairs consumed.
    offsets = [sum(v.offsets.values()) for v in trained]
    assert offsets == sorted(offsets) and offsets[0] >= 8, "each version stores the offsets it consumed"

    # Every trained pair is in exactly one version, and the final policy prefers the chosen rewrites of the
    # pairs it was trained on more than the starting policy does: the DPO margin rose from zero.
    with store.read_session() as session:
        per_version = [pairs_of_version(session, v.id) for v in trained]
    assert all(len(ids) == 8 for ids in per_version)
    # The demo never restarts its learner, so its versions carry no optimizer state (it tripled their size).
    assert not (store.load_dir(trained[-1]) / "optimizer.safetensors").exists()
    # LoRA adapters over the start, a few hundred KB for this 1.3 MB model, served merged into it.
    assert {(v.kind, v.tags["base_version"]) for v in trained} == {("lora", versions[0].id)}
    assert max(v.size_bytes for v in trained) < versions[0].size_bytes / 2
    final, tokenizer = load_stored_policy(store, trained[-1])
    reference, _ = load_stored_policy(store, versions[0])
    served_pairs = list(zip(progress.prompts, progress.chosen_texts, progress.rejected_texts, strict=True))
    batch = tokenize_pairs(tokenizer, served_pairs[: 8 * len(trained)])
    with torch.no_grad():
        policy_chosen, policy_rejected = sequence_logprobs(final, batch)
        ref_chosen, ref_rejected = sequence_logprobs(reference, batch)
    margin = float(((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).mean())
    assert margin > 0.0, f"implicit reward margin {margin}"

    # Every query was scored once (ties too), and the demo attributes each reward to its serving version.
    assert len(progress.query_rewards) == 64 and all(0.0 <= r <= 1.0 for r in progress.query_rewards)
    assert set(progress.reward_versions) <= {v.id for v in versions}

    # The rewriter picked up new versions after their announcements.
    served = {v for v in progress.served_versions if v is not None}
    assert served & {v.id for v in trained}, f"the rewriter only ever served {served}"

    # The run's summary says how much spelling evidence it saw: the known misspellings among its queries.
    summary = json.loads((progress.run.run_dir / "summary.json").read_text())
    corrections = known_corrections(progress.run.settings)
    typed = sum(normalise_query(query) in corrections for query, _ in progress.served_texts)
    assert summary["spelling"]["misspelled"] == typed and len(progress.served_texts) == 64
    store.close()
    shutil.rmtree(progress.run.run_dir)  # the run's weights live in it
