"""The learner's resident memory over a long run: does anything grow with the number of pairs trained?

    .venv/bin/python benchmarks/bench_learner_rss.py [--pairs 5000] [--publish-every 10]

The real broker, a private SQLite store and private topics, the tiny random policy (memory that grows per pair
is what this looks for, not the model's size). ``--pairs`` distinct pairs go to the pair topic, then the
learner of ``learner.worker`` (the same ``build`` and ``run_once`` as ``qrloop learn``) trains on all of them;
its RSS (``/proc/self/status`` VmRSS) is sampled after every step. Before, the learner loaded every trained
pair id into a set at start and added every new one; now a batch's ids are checked against the training
records with one indexed query, and nothing per pair stays in memory once it is published.

Printed: RSS after the first step (model, optimizer, allocator warmed up), after 25/50/75/100% of the pairs,
the maximum, and the least-squares slope of RSS over the second half of the run in KiB per 1,000 pairs.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import typer
from kafka import KafkaProducer

from learner.ledger import training_counts
from learner.worker import build
from policy_store import db
from qrloop.events import PreferencePair, encode, pair_id_for
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import get_settings
from qrloop.topics import ensure_topics

QUERIES = [
    "angle bracket",
    "cordless drill",
    "toungh groove",
    "paint storage contaiers",
    "shower faucet trim",
]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pair(n: int) -> PreferencePair:
    query = QUERIES[n % len(QUERIES)]
    event_id = f"rss-{n}"
    return PreferencePair(
        pair_id=pair_id_for(event_id),
        prompt=query,
        chosen=f"{query} kit {n % 97}",
        rejected=f"{query} {n}",
        chosen_reward=0.6,
        rejected_reward=0.3,
        chosen_components={},
        rejected_components={},
        policy_version=1,
        source_event_id=event_id,
        event_time=datetime.now(UTC),
    )


def slope_kib_per_1000(points: list[tuple[int, float]]) -> float:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var * 1024 * 1000


def main(pairs: int = 5000, publish_every: int = 10, threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)
    base = get_settings()
    prefix = f"bench-rss-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(dir=base.cache_dir) as tmp:
        root = Path(tmp)
        topics = base.topics.model_copy(
            update={
                "preference_pairs": f"{prefix}.p",
                "policy_versions": f"{prefix}.v",
                "dead_letter": f"{prefix}.d",
            }
        )
        settings = base.model_copy(
            update={
                "database_url": f"sqlite:///{root / 'qrloop.db'}",
                "blob_dir": root / "blobs",
                "topics": topics,
                "dpo": base.dpo.model_copy(
                    update={"learner_name": prefix, "publish_every": publish_every, "learning_rate": 1e-4}
                ),
            }
        )
        ensure_topics(
            settings, {topics.preference_pairs: 1, topics.policy_versions: 1, topics.dead_letter: 1}
        )
        db.upgrade(settings.db_url)
        store = open_store(settings)
        start = store.publish(build_tiny_policy(root / "tiny", require_policy(base)), base_model="tiny")
        store.set_alias("production", start.id)
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=20)
        for n in range(pairs):
            p = pair(n)
            producer.send(topics.preference_pairs, key=p.pair_id.encode(), value=encode(p))
        producer.flush()
        producer.close()

        learner = build(settings)
        steps_needed = pairs // settings.dpo.batch_size
        samples: list[tuple[int, float]] = []  # (pairs trained, RSS MiB)
        started = time.monotonic()
        while len(samples) < steps_needed:
            before = learner.state.steps
            learner.run_once(timeout_ms=500)
            if learner.state.steps > before:
                samples.append((learner.state.steps * settings.dpo.batch_size, rss_mib()))
                if len(samples) % 25 == 0:  # progress, in case a loaded machine makes the run long
                    trained, rss = samples[-1]
                    took = time.monotonic() - started
                    print(f"  {trained} pairs: {rss:.0f} MiB ({took:.0f} s)", flush=True)
        seconds = time.monotonic() - started
        learner.consumer.close()
        learner.producer.close()
        with store.read_session() as session:
            counts = training_counts(session, prefix)
        store.close()

    def at(share: float) -> str:
        trained, rss = samples[max(0, int(len(samples) * share) - 1)]
        return f"{rss:.0f} MiB after {trained} pairs"

    half = samples[len(samples) // 2 :]
    print(f"learner RSS, tiny policy, {pairs} pairs in {len(samples)} steps, publish every {publish_every}:")
    print(f"  first step: {samples[0][1]:.0f} MiB")
    for share in (0.25, 0.5, 0.75, 1.0):
        print(f"  {int(share * 100):3d}%: {at(share)}")
    print(
        f"  max {max(r for _, r in samples):.0f} MiB; slope over the second half "
        f"{slope_kib_per_1000(half):+.0f} KiB per 1,000 pairs"
    )
    print(
        f"  training records: {sum(counts.values())} rows for {len(counts)} pairs "
        f"({sum(1 for c in counts.values() if c > 1)} trained twice); {seconds:.0f} s; pid {os.getpid()}"
    )


if __name__ == "__main__":
    typer.run(main)
