"""The learner on the real broker and both databases: versions with lineage and offsets, skipped duplicates,
and exactly-once training across kill -9 at arbitrary moments (between steps, mid-step, mid-publish)."""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from learner.lease import lease_name
from learner.worker import LEARNER_TAG, build, resume_state, training_triples, what_the_deadline_left
from policy_store import ADAPTER_BASE_TAG, Leases, PolicyStore, PolicyVersion, db
from qrloop.models import build_tiny_policy, load_stored_policy, require_policy
from qrloop.runs import isolate, open_store
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import learner_env, ledger_counts, pair, publish_pairs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()))


@pytest.fixture
def learner_settings(settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dir: Path) -> Settings:
    isolated = isolate(settings, unique_topic, None)  # the store stays the db_url fixture's
    topics = isolated.topics.model_copy(update={"pair_partitions": 3})  # pairs keyed by id spread over all
    dpo = isolated.dpo.model_copy(update={"learning_rate": 1e-4})
    configured = isolated.model_copy(update={"topics": topics, "dpo": dpo})
    ensure_topics(configured)
    db.upgrade(configured.db_url)
    store = open_store(configured)
    start = store.publish(tiny_dir, base_model="tiny-llama", actor="test")
    store.set_alias("production", start.id, reason="start", actor="test")
    store.close()
    return configured


def test_versions_lineage_offsets_and_duplicates(
    learner_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = learner_settings
    caplog.set_level(logging.INFO, logger="qrloop.learner")
    pairs = [pair(n) for n in range(48)]
    # The aggregator re-emits pair 3 (at-least-once): same id, trained once. A malformed message is skipped.
    publish_pairs(settings, [*pairs[:20], pairs[3], *pairs[20:]], extra=[b"{broken"])
    learner = build(settings)
    versions: list[int] = []
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
    # One stored offset per partition; together they count the records consumed: 16 pairs a step, plus the
    # duplicate and the malformed record wherever the partitions' interleaving put them.
    partitions = {f"{settings.topics.preference_pairs}:{p}" for p in range(3)}
    assert set(chain[-1].offsets) == partitions and min(chain[-1].offsets.values()) > 0, "spread over 3"
    consumed = [sum(v.offsets.values()) for v in chain]
    assert [16 <= c - 16 * k <= 18 for k, c in enumerate(consumed)] == [True] * 3, consumed
    assert store.resolve("production").id == versions[-1]
    # Each publish says where its time went (save, store, announcement): #17's step → served latency.
    timed = [m for m in caplog.messages if m.startswith("published version")]
    assert [int(m.split()[2]) for m in timed] == versions and all(" (save " in m for m in timed), timed
    counts = ledger_counts(settings)
    assert len(counts) == 48 and set(counts.values()) == {1}
    assert set(counts) == {p.pair_id for p in pairs}

    # A restart resumes every partition from the offsets stored with the latest version, and goes on.
    restarted = build(settings)
    assigned = restarted.consumer.assignment()
    positions = {f"{tp.topic}:{tp.partition}": restarted.consumer.position(tp) for tp in assigned}
    assert positions == chain[-1].offsets
    more = [pair(n) for n in range(48, 64)]
    publish_pairs(settings, more)
    deadline = time.monotonic() + 120
    fourth = None
    while fourth is None and time.monotonic() < deadline:
        fourth = restarted.run_once(timeout_ms=500)
    restarted.consumer.close()
    assert fourth is not None and store.get(fourth).parent_id == versions[-1]
    counts = ledger_counts(settings)
    assert set(counts) == {p.pair_id for p in pairs + more} and set(counts.values()) == {1}
    store.close()


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13, 17, 21]])).logits


def test_a_lora_lineage_publishes_adapters_that_serve_as_trained_and_resume(
    learner_settings: Settings,
) -> None:
    """dpo.lora_r > 0: each version is the adapter alone, over the lineage's start; a rewriter loads it
    merged into that start, and a restarted learner resumes the same adapter and AdamW moments."""
    dpo = learner_settings.dpo.model_copy(update={"lora_r": 4, "learning_rate": 1e-2})
    settings = learner_settings.model_copy(update={"dpo": dpo})
    publish_pairs(settings, [pair(n) for n in range(48)])
    learner = build(settings)
    versions: list[int] = []
    deadline = time.monotonic() + 120
    while len(versions) < 2 and time.monotonic() < deadline:
        if published := learner.run_once(timeout_ms=500):
            versions.append(published)
    learner.consumer.close()
    store = open_store(settings)
    start, chain = store.get(1), [store.get(v) for v in versions]
    assert [(v.kind, v.tags[ADAPTER_BASE_TAG], v.parent_id) for v in chain] == [
        ("lora", 1, 1),
        ("lora", 1, versions[0]),
    ]
    # The tiny model is 1.3 MB; its rank-4 adapter (and AdamW's two moments) a fraction of it.
    assert all(v.size_bytes < start.size_bytes / 4 for v in chain), [v.size_bytes for v in chain]

    served, _ = load_stored_policy(store, chain[-1])
    assert not isinstance(served, PeftModel), "the rewriter gets a plain transformers model"
    trained = learner.core.policy.eval()
    assert torch.allclose(probe_logits(served), probe_logits(trained), atol=1e-5), "serves what was trained"
    base, _ = load_stored_policy(store, start)
    assert not torch.allclose(probe_logits(served), probe_logits(base), atol=1e-3), "the adapter moved"
    # Two versions over one base share its untouched tensors and own only the weights the adapter changes.
    earlier, _ = load_stored_policy(store, chain[0])
    owned = {
        name
        for name, p in served.named_parameters()
        if p.data_ptr() != dict(earlier.named_parameters())[name].data_ptr()
    }
    assert owned and all(
        name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for name in owned
    )
    # Stock transformers loads it too: the base's checkout, then the adapter (peft's format).
    stock = AutoModelForCausalLM.from_pretrained(str(store.load_dir(start)))
    stock.load_adapter(str(store.load_dir(chain[-1])))
    assert torch.allclose(probe_logits(stock), probe_logits(trained), atol=1e-5)

    restarted = build(settings)
    assert restarted.core.kind == "lora" and restarted.core.reference is None
    assert torch.allclose(probe_logits(restarted.core.policy.eval()), probe_logits(trained), atol=1e-6)
    moments = [s["exp_avg"] for s in restarted.core.optimizer.state.values()]
    assert moments and all(m.abs().sum() > 0 for m in moments), "AdamW resumed, not from zero"
    third = None
    deadline = time.monotonic() + 120
    while third is None and time.monotonic() < deadline:
        third = restarted.run_once(timeout_ms=500)
    restarted.consumer.close()
    assert third is not None and store.get(third).parent_id == versions[-1]
    assert store.get(third).kind == "lora" and store.get(third).train_steps == 3

    # A new lineage starting from production, which now holds an adapter, trains that adapter on (its
    # reference is the adapter's base): it starts from exactly what production serves.
    assert store.resolve("production").id == third
    fresh = settings.model_copy(update={"dpo": settings.dpo.model_copy(update={"learner_name": "second"})})
    second = build(fresh)
    second.consumer.close()
    assert (second.state.version, second.state.reference_version) == (third, 1)
    production, _ = load_stored_policy(store, store.get(third))
    assert torch.allclose(probe_logits(second.core.policy.eval()), probe_logits(production), atol=1e-4)
    store.close()


def start_learner(settings: Settings, log_path: Path, lease_s: float = 3.0) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qrloop", "learn"],
            cwd=REPO_ROOT,
            env=learner_env(settings, lease_s),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def lineage(store: PolicyStore, settings: Settings) -> list[PolicyVersion]:
    mine = (v for v in store.list() if v.tags.get(LEARNER_TAG) == settings.dpo.learner_name)
    return sorted(mine, key=lambda v: v.id)


def test_exactly_once_across_kill_minus_nine(learner_settings: Settings, tmp_path: Path) -> None:
    settings = learner_settings
    pairs = [pair(n) for n in range(96)]
    publish_pairs(settings, pairs)
    rng = random.Random(7)
    kills = 0

    def start() -> subprocess.Popen[bytes]:
        return start_learner(settings, tmp_path / "learner.log")

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
    counts = ledger_counts(settings)
    assert kills == 4
    assert set(counts) == {p.pair_id for p in pairs}, (tmp_path / "learner.log").read_text()[-3000:]
    assert set(counts.values()) == {1}, "no pair trained twice"
    store = open_store(settings)
    mine = lineage(store, settings)
    assert [v.train_steps for v in mine] == list(range(1, 7)), "six steps of sixteen, none repeated or lost"
    assert [v.parent_id for v in mine[1:]] == [v.id for v in mine[:-1]]
    store.close()


def test_two_learners_one_chain_standby_takes_over(learner_settings: Settings, tmp_path: Path) -> None:
    settings = learner_settings
    pairs = [pair(n) for n in range(64)]
    publish_pairs(settings, pairs[:32])
    logs = {name: tmp_path / f"learner-{name}.log" for name in "ab"}
    # A lease long enough that the holder keeps it on a loaded machine (a handover before the kill would be
    # correct too, but then the kill would not be what the standby recovers from).
    processes = {name: start_learner(settings, path, lease_s=10) for name, path in logs.items()}
    store = open_store(settings)

    def trained() -> int:
        return sum(ledger_counts(settings).values())

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 240
        while trained() < count and time.monotonic() < deadline:
            exited = {n: p.returncode for n, p in processes.items() if p.poll() is not None}
            assert not exited, f"no learner exits (or crash-loops): {exited}\n" + "\n".join(
                path.read_text()[-3000:] for path in logs.values()
            )
            time.sleep(0.5)

    try:
        wait_for(32)
        holder = Leases(store).current(lease_name(settings))
        assert holder is not None
        active = next(n for n, p in processes.items() if holder.holder.split(":")[1] == str(p.pid))
        standby = next(n for n in processes if n != active)
        assert "standby: lease" in logs[standby].read_text(), "the second learner waited, it did not train"

        processes.pop(active).send_signal(signal.SIGKILL)
        publish_pairs(settings, pairs[32:])
        wait_for(64)
        survivor = processes[standby]
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=60) == 0
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()
    output = {name: path.read_text() for name, path in logs.items()}
    counts = ledger_counts(settings)
    assert set(counts) == {p.pair_id for p in pairs}, output[standby][-3000:]
    assert set(counts.values()) == {1}, "every pair trained exactly once"
    mine = lineage(store, settings)
    assert [v.train_steps for v in mine] == [1, 2, 3, 4]
    assert [v.parent_id for v in mine] == [1] + [v.id for v in mine[:-1]], "one parent chain"
    took_over = f"lease {lease_name(settings)} acquired by"
    assert took_over in output[standby] and f"epoch {holder.epoch + 1}" in output[standby], "a new epoch"
    assert all("Traceback" not in text for text in output.values()), output
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
    versions: list[int] = []
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
    assert sum(rebased.offsets.values()) == 32, "the rejected version's pairs are not replayed"
    learner.consumer.close()

    # A restarted learner whose latest version was rejected rebases the same way, from the stored offsets.
    store.set_alias("canary", 1, reason="rollback", actor="test")
    store.reject(second, reason="worse again", actor="test")
    state = resume_state(store, settings)
    assert (state.version, state.reference_version, sum(state.offsets.values())) == (1, 1, 32)
    store.close()


def test_echo_pairs_are_implied_only_where_the_chosen_rewrite_added_something() -> None:
    """Under the gain an echo earns 0: a chosen rewrite with novelty or new engagement beats it; one that
    added nothing does not, and a pair that already has the echo in it is not doubled."""
    added = pair(0).model_copy(update={"chosen_components": {"novelty": 0.2, "engagement": 0.0}})
    engaged = pair(1).model_copy(update={"chosen_components": {"novelty": 0.0, "engagement": 0.1}})
    nothing = pair(2).model_copy(update={"chosen_components": {"novelty": 0.0, "engagement": 0.0}})
    echo_lost = added.model_copy(update={"pair_id": "x", "rejected": f" {added.prompt.upper()} "})
    batch = [added, engaged, nothing, echo_lost]
    assert training_triples(batch, echo_rejected=False) == [(p.prompt, p.chosen, p.rejected) for p in batch]
    assert training_triples(batch, echo_rejected=True)[len(batch) :] == [
        (added.prompt, added.chosen, added.prompt),
        (engaged.prompt, engaged.chosen, engaged.prompt),
    ]


def test_the_stop_watchdog_says_nothing_was_committed_only_when_no_publish_finished_while_it_waited() -> None:
    abandoned = what_the_deadline_left(version_at_deadline=4, version_now=4)
    waited = what_the_deadline_left(version_at_deadline=4, version_now=5)
    assert "nothing of it was committed" in abandoned and "from version 4's offsets" in abandoned
    assert "nothing of it was committed" not in waited and "version 5" in waited
