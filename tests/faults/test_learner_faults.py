"""The learner under faults, on the real broker and both databases: re-sent pairs with publish_every > 1,
poison records, AdamW resumed bit-identically, a SIGKILL at each named fault point (and at random moments),
and stored offsets that fell out of the topic. Exactly-once is counted from the training records
(step → pair ids), which would show a pair trained twice instead of refusing it."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient, TopicPartition
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from learner.dpo import OPTIMIZER_FILE
from learner.worker import LEARNER_TAG, Learner, build
from qrloop.events import PolicyAnnouncement, decode, encode
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from tests.faults.conftest import (
    dead_letters,
    learner_env,
    read_topic,
    send_all,
    send_pairs,
    steps,
    trained,
)
from tests.helpers import pair

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def run_until(learner: Learner, versions: int, timeout_s: float = 180) -> list[int]:
    published: list[int] = []
    deadline = time.monotonic() + timeout_s
    while len(published) < versions and time.monotonic() < deadline:
        version = learner.run_once(timeout_ms=300)
        if version:
            published.append(version)
    assert len(published) == versions, f"{len(published)} of {versions} versions within {timeout_s} s"
    return published


def with_dpo(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"dpo": settings.dpo.model_copy(update=update)})


# -------------------------------------------------------------------------------------------- crash loops


def test_a_resent_pair_with_publish_every_two_is_trained_once(learner_settings: Settings) -> None:
    """Pair 3 comes again inside the next (unpublished) step's batch and again after the publish: the first
    re-send was an IntegrityError at the publish, after every restart."""
    settings = with_dpo(learner_settings, publish_every=2)
    pairs = [pair(n) for n in range(64)]
    stream = [*pairs[:20], pairs[3], *pairs[20:40], pairs[3], pairs[17], *pairs[40:]]
    send_pairs(settings, stream)
    learner = build(settings)
    run_until(learner, 2)  # 4 steps of 16 unique pairs, published every 2
    learner.consumer.close()
    counts = trained(settings)
    assert set(counts) == {p.pair_id for p in pairs} and set(counts.values()) == {1}, counts
    assert sorted(steps(settings)) == [1, 2, 3, 4]


def test_poison_pairs_are_dead_lettered_and_training_goes_on(learner_settings: Settings) -> None:
    settings = learner_settings
    valid = encode(pair(0)).decode()
    poison = {
        "huge_number": valid.replace('"chosen_reward":0.6', '"chosen_reward":' + "9" * 5000).encode(),
        "deep_nesting": valid.replace(
            '"chosen_components":{}', '"chosen_components":' + "[" * 5000 + "]" * 5000
        ).encode(),
        "bad_utf8": valid.replace('"prompt":"angle bracket"', '"prompt":"angle \\udc80"').encode() + b"\xff",
        "year_9999": valid.replace(
            valid[valid.index('"event_time":') :], '"event_time":"9999-12-31T23:59:59-05:00"}'
        ).encode(),
        "future": encode(pair(1, datetime.now(UTC) + timedelta(days=2))),
        "wrong_type": valid.replace('"chosen":"angle bracket kit"', '"chosen":["kit"]').encode(),
    }
    send_all(settings, settings.topics.preference_pairs, ((b"bad", raw) for raw in poison.values()))
    send_pairs(settings, [pair(n) for n in range(2, 18)])
    learner = build(settings)
    run_until(learner, 1)
    learner.producer.flush()
    learner.consumer.close()
    letters = dead_letters(settings)
    reasons = {letter.original_bytes(): letter.reason for letter in letters}
    landed = {name: reasons.get(raw) for name, raw in poison.items()}
    assert landed == {
        "huge_number": "malformed_json",
        "deep_nesting": "malformed_json",
        "bad_utf8": "malformed_json",
        "year_9999": "invalid_schema",
        "future": "event_time_out_of_range",
        "wrong_type": "invalid_schema",
    }, landed
    assert len(trained(settings)) == 16


# -------------------------------------------------------------------------------------- crash-safe state


def test_resumed_optimizer_ends_bit_identical_to_an_uninterrupted_run(
    learner_settings: Settings, unique_topic: str
) -> None:
    """Two lineages on the same pairs: one runs 4 steps; the other stops after step 2 (a new process would
    build exactly this: everything from the store) and runs steps 3 and 4 after resuming."""
    send_pairs(learner_settings, [pair(n) for n in range(64)])
    # Each lineage moves an alias of its own; both start from production's version.
    straight = with_dpo(learner_settings, learner_name=f"{unique_topic}-straight", alias="straight")
    resumed = with_dpo(learner_settings, learner_name=f"{unique_topic}-resumed", alias="resumed")

    learner = build(straight)
    last_straight = run_until(learner, 4)[-1]
    learner.consumer.close()
    first = build(resumed)
    run_until(first, 2)
    first.consumer.close()
    second = build(resumed)
    assert second.state.steps == 2
    last_resumed = run_until(second, 2)[-1]
    second.consumer.close()

    store = open_store(learner_settings)
    a, b = store.load_dir(last_straight), store.load_dir(last_resumed)
    weights_a, weights_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "weights differ"
    adam_a, adam_b = load_file(str(a / OPTIMIZER_FILE)), load_file(str(b / OPTIMIZER_FILE))
    assert adam_a.keys() == adam_b.keys() and all(torch.equal(adam_a[k], adam_b[k]) for k in adam_a)
    assert float(adam_b["state.0.step"]) == 4.0, "AdamW's step count went on from 2, not from 0"
    assert (a / OPTIMIZER_FILE).read_bytes()[:1] != b"\x80", "safetensors, not a pickle"
    store.close()


def start_learner(settings: Settings, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "qrloop", "learn"],
        cwd=REPO_ROOT,
        env=learner_env(settings, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for_training(settings: Settings, n: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while sum(trained(settings).values()) < n and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def mine(settings: Settings) -> list[int]:
    store = open_store(settings)
    ids = sorted(v.id for v in store.list() if v.tags.get(LEARNER_TAG) == settings.dpo.learner_name)
    store.close()
    return ids


@pytest.mark.parametrize("point", ["after_step", "mid_blob_write", "after_db_commit", "before_announce"])
def test_sigkill_at_a_named_fault_point_loses_and_repeats_nothing(
    learner_settings: Settings, point: str, tmp_path: Path
) -> None:
    settings = learner_settings
    pairs = [pair(n) for n in range(48)]
    send_pairs(settings, pairs)
    log = tmp_path / "learner.log"
    # The second time the point is reached: the first version is out, the kill hits the second step.
    process = start_learner(settings, log, QRLOOP_FAULT=point, QRLOOP_FAULT_HIT="2")
    assert process.wait(timeout=240) == -signal.SIGKILL, log.read_text()[-3000:]
    assert f"fault point {point} reached" in log.read_text()
    store = open_store(settings)
    alias, versions = store.resolve("production").id, mine(settings)
    # Where the kill landed, as the store shows it.
    if point == "mid_blob_write":
        assert list(store.blobs.iter_temp()), "a half-written blob is left in the blob directory"
    if point == "after_db_commit":
        assert alias != versions[-1], "committed, the alias not moved yet"
    if point == "before_announce":
        announced = [
            decode(PolicyAnnouncement, v) for v in read_topic(settings, settings.topics.policy_versions)
        ]
        assert alias == versions[-1] and versions[-1] not in {a.version for a in announced}
    store.close()

    process = start_learner(settings, log)
    wait_for_training(settings, 48, process, log)
    counts = trained(settings)
    assert set(counts) == {p.pair_id for p in pairs}, "no pair lost"
    assert set(counts.values()) == {1}, "no pair trained twice"
    assert {step: len(ids) for step, ids in steps(settings).items()} == {1: 16, 2: 16, 3: 16}
    store = open_store(settings)
    versions = mine(settings)
    assert [store.get(v).train_steps for v in versions] == [1, 2, 3]
    assert store.resolve("production").id == versions[-1]
    announced = [decode(PolicyAnnouncement, v) for v in read_topic(settings, settings.topics.policy_versions)]
    assert {a.version for a in announced if a.kind == "alias_moved"} >= set(versions), (
        "every version announced"
    )
    store.close()


def test_sigkill_at_random_moments_loses_and_repeats_nothing(
    learner_settings: Settings, tmp_path: Path
) -> None:
    """Three kills at random moments after the 1st, 2nd and 3rd publish (a step takes seconds under load, so
    a kill before the first publish would only ever hit step 1). Where they landed is printed."""
    settings = learner_settings
    pairs = [pair(n) for n in range(80)]
    send_pairs(settings, pairs)
    log = tmp_path / "learner.log"
    rng = random.Random(11)
    landed: list[tuple[int, str]] = []  # (training records, the learner's last log line) at each kill
    process = start_learner(settings, log)
    for kill in range(1, 4):
        # After the kill-th publish (so each kill has something behind it), a random moment in the next
        # 0-6 s: between steps, inside the next step, or inside its publish.
        deadline = time.monotonic() + 240
        while sum(trained(settings).values()) < 16 * kill and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 6.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        last = [line for line in log.read_text().splitlines() if "qrloop.learner" in line or "DPO" in line]
        landed.append((sum(trained(settings).values()), last[-1][-60:] if last else ""))
        process = start_learner(settings, log)
    wait_for_training(settings, 80, process, log)
    counts = trained(settings)
    print(f"random kills landed at {landed}")
    assert set(counts) == {p.pair_id for p in pairs} and set(counts.values()) == {1}, counts
    assert {step: len(ids) for step, ids in steps(settings).items()} == {s: 16 for s in range(1, 6)}


# ---------------------------------------------------------------------------------- silent wrong answers


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_offsets_deleted_before_they_were_read_are_reported_and_counted(
    learner_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = learner_settings
    topic = settings.topics.preference_pairs
    send_pairs(settings, [pair(n) for n in range(48)])
    learner = build(settings)
    run_until(learner, 1)  # offsets stored: 16
    learner.consumer.close()
    # Retention (here: an explicit delete-records) removes 16..39 while the learner is down.
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    admin.delete_records({TopicPartition(topic, 0): 40})
    admin.close()
    send_pairs(settings, [pair(n) for n in range(48, 56)])
    labels = {"role": "learner", "topic": topic, "partition": "0"}
    before = metric("qrloop_records_lost_total", **labels)
    restarted = build(settings)
    run_until(restarted, 1)
    restarted.consumer.close()
    assert metric("qrloop_records_lost_total", **labels) - before == 24
    assert any("records 16..39 (24) were deleted" in r.getMessage() for r in caplog.records)
    counts = trained(settings)
    assert {f"event-{n}" for n in range(16, 40)}.isdisjoint(
        {p.source_event_id for p in (pair(n) for n in range(56)) if p.pair_id in counts}
    )
    assert len(counts) == 32 and set(counts.values()) == {1}
