"""Per-role throughput at 1 and 2 processes, and takeover times after a kill, in one run.

    .venv/bin/python benchmarks/bench_scale.py [--repeats 3] [--queries 120] [--only learner,rewriter,...]

Every figure is measured side by side in this run on the real broker, store and models:

- aggregator: feedback messages/s (interactions + session ends) through 1 and 2 `qrloop aggregate` workers in
  one consumer group over 4 partitions, from the first event sent to the last pair read; each worker has
  scored warm-up windows first (M1 is loaded on first use);
- learner: pairs/s of one DPO step on 16 pairs of the real SmolLM2-135M, one process with 2 threads vs two
  gloo ranks with 1 thread each (``learner.distributed.data_parallel_step``; no Kafka, just the step);
- rewriter: queries/s of 1 and 2 `qrloop serve` processes (real policy), two client threads per process,
  the machine's 2 cores split between the processes' torch threads;
- takeover: a standby learner (tiny policy, ``dpo.lease_s``) after the active one is killed -9: seconds to
  the lease and to its first publish; a surviving aggregator after the other is killed -9: seconds until it
  owns every partition and until every window opened after the kill is scored.

Medians of ``--repeats`` where a role is repeated. The machine has 2 cores shared with other work: a
second process of a CPU-bound role cannot exceed 2 cores' worth, so the 2-process ratios say how little the
design loses by splitting (coordination), not how it scales on more cores; the load average is printed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from bench_dpo import PAIRS  # the same 16 pairs the step benchmark times
from kafka import KafkaConsumer, KafkaProducer

from learner.distributed import data_parallel_step, free_port
from learner.dpo import DPOConfig, DPOLearnerCore
from learner.lease import lease_name
from policy_store import Leases, db
from qrloop.catalog import Catalog
from qrloop.events import (
    Interaction,
    PolicyAnnouncement,
    PreferencePair,
    QueryEvent,
    Rewrite,
    SessionEnd,
    decode,
    encode,
    pair_id_for,
)
from qrloop.models import build_tiny_policy, load_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings, get_settings
from qrloop.topics import ensure_topics

CLICKS = 3  # per query, on the second rewrite's products; then a session end
results: dict[str, Any] = {}


def record(name: str, value: float) -> None:
    """Keep a figure and print it at once: a later section failing does not lose it."""
    results[name] = value
    print(f"  {name}: {value:.2f}", flush=True)


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def log_dir(settings: Settings) -> Path:
    """The roles' logs outlive the run (the stores and weights do not): read them when a figure is odd."""
    path = settings.cache_dir / "bench_scale_logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s} s")
        time.sleep(0.1)


# -- isolated settings and processes ------------------------------------------------------------------------


def isolated(base: Settings, root: Path, name: str) -> Settings:
    topics = base.topics.model_copy(
        update={
            "query_events": f"{name}.q",
            "interactions": f"{name}.i",
            "preference_pairs": f"{name}.p",
            "policy_versions": f"{name}.v",
            "dead_letter": f"{name}.d",
            "query_outcomes": f"{name}.o",
            "partitions": 4,
        }
    )
    streams = base.streams.model_copy(
        update={
            "app_id": f"{name}-agg",
            "attribution_window_s": 600.0,
            "tick_s": 0.2,
            "orphan_after_s": 1200.0,
            "session_timeout_s": 6.0,
        }
    )
    dpo = base.dpo.model_copy(update={"learner_name": name, "lease_s": 3.0})
    settings = base.model_copy(
        update={
            "topics": topics,
            "streams": streams,
            "dpo": dpo,
            "database_url": f"sqlite:///{root / name}.db",
            "blob_dir": root / f"{name}-blobs",
        }
    )
    ensure_topics(settings)
    db.upgrade(settings.db_url)
    return settings


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    t, s = settings.topics, settings.streams
    return dict(
        os.environ,
        QRLOOP_DATABASE_URL=settings.db_url,
        QRLOOP_BLOB_DIR=str(settings.blob_dir),
        QRLOOP_TOPICS__QUERY_EVENTS=t.query_events,
        QRLOOP_TOPICS__INTERACTIONS=t.interactions,
        QRLOOP_TOPICS__PREFERENCE_PAIRS=t.preference_pairs,
        QRLOOP_TOPICS__POLICY_VERSIONS=t.policy_versions,
        QRLOOP_TOPICS__DEAD_LETTER=t.dead_letter,
        QRLOOP_TOPICS__QUERY_OUTCOMES=t.query_outcomes,
        QRLOOP_TOPICS__PARTITIONS=str(t.partitions),
        QRLOOP_STREAMS__APP_ID=s.app_id,
        QRLOOP_STREAMS__ATTRIBUTION_WINDOW_S=str(s.attribution_window_s),
        QRLOOP_STREAMS__TICK_S=str(s.tick_s),
        QRLOOP_STREAMS__ORPHAN_AFTER_S=str(s.orphan_after_s),
        QRLOOP_STREAMS__SESSION_TIMEOUT_S=str(s.session_timeout_s),
        QRLOOP_DPO__LEARNER_NAME=settings.dpo.learner_name,
        QRLOOP_DPO__LEASE_S=str(settings.dpo.lease_s),
        QRLOOP_DPO__LEARNING_RATE="1e-4",
        QRLOOP_CANARY__ENABLED="false",
        QRLOOP_LOGGING__LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        **extra,
    )


@contextmanager
def processes(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> Iterator[list[Any]]:
    started = []
    for command, log_path in zip(commands, logs, strict=True):
        with log_path.open("wb") as sink:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "qrloop", *command],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- aggregator ---------------------------------------------------------------------------------------------


def queries(catalog: Catalog, n: int, rng: random.Random) -> list[QueryEvent]:
    ids = catalog.product_ids
    now = datetime.now(UTC)
    made = []
    for _ in range(n):
        lists = [rng.sample(ids, 4) for _ in range(3)]
        made.append(
            QueryEvent(
                event_id=str(uuid.uuid4()),
                event_time=now,
                shopper_id="bench",
                session_id="bench",
                query=catalog.product(lists[0][0]).title.split(" ", 3)[0],
                policy_version=1,
                arm="production",
                original_products=lists[0],
                rewrites=[
                    Rewrite(rewrite_id="r1", text="first", logprob=-3.0, products=lists[1]),
                    Rewrite(rewrite_id="r2", text="second", logprob=-2.0, products=lists[2]),
                ],
            )
        )
    return made


def send_queries(settings: Settings, events: list[QueryEvent]) -> int:
    """Each query, three clicks on its second rewrite's products, a session end. Returns feedback sent."""
    t = settings.topics
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=5)
    sent = 0
    for event in events:
        key = event.event_id.encode()
        producer.send(t.query_events, key=key, value=encode(event))
        for i, product in enumerate(event.rewrites[1].products[:CLICKS]):
            click = Interaction(
                event_id=f"{event.event_id}-{i}",
                query_event_id=event.event_id,
                rewrite_id="r2",
                product_id=product,
                position=i,
                kind="click",
                event_time=event.event_time + timedelta(seconds=1),
            )
            producer.send(t.interactions, key=key, value=encode(click))
        end = SessionEnd(
            query_event_id=event.event_id,
            shopper_id="bench",
            interactions_sent=CLICKS,
            event_time=event.event_time + timedelta(seconds=2),
        )
        producer.send(t.interactions, key=key, value=encode(end))
        sent += CLICKS + 1
    producer.flush()
    producer.close()
    return sent


class PairReader:
    def __init__(self, settings: Settings) -> None:
        self.consumer = KafkaConsumer(
            settings.topics.preference_pairs,
            bootstrap_servers=settings.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=200,
        )
        self.seen: set[str] = set()
        self.last_at = time.monotonic()

    def wait_for(self, event_ids: set[str], timeout_s: float, idle_s: float = 90.0) -> int:
        """Read pairs until every one of ``event_ids`` has one, or none came for ``idle_s``, or ``timeout_s``;
        returns how many are missing (a window that never closed is reported, not waited for forever)."""
        deadline = time.monotonic() + timeout_s
        while not event_ids <= self.seen and time.monotonic() < min(deadline, self.last_at + idle_s):
            new = {decode(PreferencePair, m.value).source_event_id for m in self.consumer} - self.seen
            if new:
                self.seen |= new
                self.last_at = time.monotonic()
        missing = len(event_ids - self.seen)
        if missing:
            print(f"  {missing} of {len(event_ids)} windows produced no pair within the wait")
        return missing


def owned(log_path: Path, topic: str) -> set[int]:
    found = re.findall(rf"assigned partitions of {re.escape(topic)}: \[([0-9, ]*)\]", log_path.read_text())
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()


def bench_aggregator(base: Settings, root: Path, workers: int, n: int, kill: bool = False) -> None:
    settings = isolated(base, root, f"bench-agg{workers}-{uuid.uuid4().hex[:6]}")
    catalog = Catalog.open(settings)
    rng = random.Random(workers)
    logs = [log_dir(base) / f"{settings.streams.app_id}-{i}.log" for i in range(workers)]
    topic = settings.topics.query_events
    with processes([["aggregate"]] * workers, env_of(settings), logs) as started:
        wait_until(lambda: all(owned(p, topic) for p in logs), 240, "every worker assigned")
        settled = {0, 1, 2, 3}
        wait_until(lambda: set().union(*(owned(p, topic) for p in logs)) == settled, 120, "a settled group")
        reader = PairReader(settings)
        warm = queries(catalog, 16, rng)  # every partition, so every worker loads M1 before the clock
        send_queries(settings, warm)
        reader.last_at = time.monotonic()
        reader.wait_for({e.event_id for e in warm}, 300, idle_s=180)
        if kill:
            survivor_log = logs[1]
            started[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            after = queries(catalog, 20, rng)
            send_queries(settings, after)
            wait_until(lambda: owned(survivor_log, topic) == {0, 1, 2, 3}, 180, "the survivor owns all")
            record("aggregator takeover: owns every partition (s)", time.monotonic() - killed)
            missing = reader.wait_for({e.event_id for e in after}, 300)
            label = (
                "every window after the kill scored" if not missing else f"windows scored, {missing} missing"
            )
            record(f"aggregator takeover: {label} (s)", reader.last_at - killed)
            return
        events = queries(catalog, n, rng)
        started_at = reader.last_at = time.monotonic()
        feedback = send_queries(settings, events)
        missing = reader.wait_for({e.event_id for e in events}, 600)
        scored = feedback * (n - missing) / n
    record(f"aggregator feedback msgs/s, {workers} worker(s)", scored / (reader.last_at - started_at))


# -- learner ------------------------------------------------------------------------------------------------


def _step_times(step: Callable[[], object], repeats: int) -> list[float]:
    step()  # warm-up: allocator, AdamW state
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def _core(settings: Settings) -> DPOLearnerCore:
    policy, tokenizer = load_policy(require_policy(settings))
    return DPOLearnerCore.from_model(policy, tokenizer, DPOConfig.from_settings(settings.dpo))


def _ddp_rank(rank: int, world: int, port: int, repeats: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    core = _core(get_settings())
    times = _step_times(lambda: data_parallel_step(core, PAIRS, rank, world), repeats)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def _single_process_times(settings: Settings, repeats: int) -> list[float]:
    core = _core(settings)  # freed on return, before the ranks load their own copies
    return _step_times(lambda: core.step(PAIRS), repeats)


def bench_learner(settings: Settings, repeats: int) -> None:
    torch.set_num_threads(2)
    single = statistics.median(_single_process_times(settings, repeats))
    record("learner pairs/s, 1 process x 2 threads", len(PAIRS) / single)
    context = mp.get_context("spawn")
    out = context.Queue()
    mp.start_processes(_ddp_rank, args=(2, free_port(), repeats, out), nprocs=2, start_method="spawn")
    record("learner pairs/s, 2 gloo ranks x 1 thread", len(PAIRS) / statistics.median(out.get()))


# -- rewriter -----------------------------------------------------------------------------------------------


def rewrite(port: int, query: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rewrite",
        data=json.dumps({"query": query, "shopper_id": str(uuid.uuid4())}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def bench_rewriter(base: Settings, root: Path, servers: int, n: int) -> None:
    settings = isolated(base, root, f"bench-rw{servers}-{uuid.uuid4().hex[:6]}")
    with open_store(settings) as store:
        version = store.publish(require_policy(settings), base_model="smollm2-135m", actor="bench")
        store.set_alias("production", version.id, reason="bench", actor="bench")
    ports = [free_port() for _ in range(servers)]
    logs = [log_dir(base) / f"rewriter-{port}.log" for port in ports]
    # The rewriter takes torch's default thread count, which OMP_NUM_THREADS sets: 2 cores split evenly.
    cores = str(max(1, 2 // servers))
    env = env_of(settings, QRLOOP_MODELS__TORCH_THREADS=cores) | {"OMP_NUM_THREADS": cores}
    commands = [["serve", "--port", str(port)] for port in ports]
    texts = [query for query, _, _ in PAIRS]
    with processes(commands, env, logs):
        wait_until(lambda: all(ready(p) for p in ports), 300, "rewriters ready")
        for port in ports:
            rewrite(port, "warm up")
        jobs = [(ports[i % servers], texts[i % len(texts)]) for i in range(n)]
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    if not jobs:
                        return
                    port, text = jobs.pop()
                rewrite(port, text)

        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(2 * servers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        record(f"rewriter queries/s, {servers} process(es)", n / (time.monotonic() - started))
        if servers > 1:
            record("rewriters: gap between their swaps to a new version (s)", swap_gap(settings, logs))


def swap_gap(settings: Settings, logs: list[Path]) -> float:
    """Publish a version, move the alias, announce it (the learner's path); seconds between the first and
    the last rewriter logging that it serves it."""
    with open_store(settings) as store:
        version = store.publish(require_policy(settings), base_model="smollm2-135m", actor="bench")
        store.set_alias("production", version.id, reason="bench", actor="bench")
    note = PolicyAnnouncement(kind="alias_moved", version=version.id, alias="production")
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    producer.send(settings.topics.policy_versions, key=str(version.id).encode(), value=encode(note))
    producer.flush()
    producer.close()
    line = re.compile(rf"^(\S+ \S+) INFO .*now serving version {version.id} ", re.M)
    wait_until(lambda: all(line.search(p.read_text(errors="replace")) for p in logs), 300, "both swaps")
    stamps = []
    for path in logs:
        found = line.search(path.read_text(errors="replace"))
        assert found is not None
        stamps.append(datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return max(stamps) - min(stamps)


# -- learner takeover ---------------------------------------------------------------------------------------


def pair(n: int) -> PreferencePair:
    query, chosen, rejected = PAIRS[n % len(PAIRS)]
    return PreferencePair(
        pair_id=pair_id_for(f"bench-{n}"),
        prompt=query,
        chosen=chosen,
        rejected=f"{rejected} {n}",
        chosen_reward=0.6,
        rejected_reward=0.3,
        chosen_components={},
        rejected_components={},
        policy_version=1,
        source_event_id=f"bench-{n}",
        event_time=datetime.now(UTC),
    )


def send_pairs(settings: Settings, numbers: range) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for n in numbers:
        p = pair(n)
        producer.send(settings.topics.preference_pairs, key=p.pair_id.encode(), value=encode(p))
    producer.flush()
    producer.close()


def bench_learner_takeover(base: Settings, root: Path) -> None:
    settings = isolated(base, root, f"bench-lease-{uuid.uuid4().hex[:6]}")
    tiny = build_tiny_policy(root / "tiny", require_policy(settings))
    store = open_store(settings)
    start = store.publish(tiny, base_model="tiny", actor="bench")
    store.set_alias("production", start.id, reason="bench", actor="bench")
    leases = Leases(store)
    name = lease_name(settings)
    logs = [log_dir(base) / f"{settings.dpo.learner_name}-{i}.log" for i in range(2)]
    with processes([["learn"], ["learn"]], env_of(settings), logs) as started:
        send_pairs(settings, range(16))
        wait_until(lambda: len(store.list()) >= 2, 300, "the first version")
        holder = leases.current(name)
        assert holder is not None
        active = next(p for p in started if holder.holder.split(":")[1] == str(p.pid))
        active.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        send_pairs(settings, range(16, 32))
        wait_until(lambda: (leases.current(name) or holder).epoch > holder.epoch, 120, "the takeover")
        record("learner takeover: lease acquired (s)", time.monotonic() - killed)
        wait_until(lambda: len(store.list()) >= 3, 300, "the standby's first version")
        record("learner takeover: first publish (s)", time.monotonic() - killed)
    record("learner takeover: dpo.lease_s", settings.dpo.lease_s)
    store.close()


SECTIONS = ("aggregator", "learner", "rewriter", "takeover")


def main(
    repeats: int = typer.Option(3, help="Timed DPO steps per configuration (median)."),
    queries_n: int = typer.Option(120, "--queries", help="Queries through the aggregator / rewriter runs."),
    only: str = typer.Option(",".join(SECTIONS), help="Comma-separated sections to run."),
) -> None:
    base = get_settings()
    chosen = set(only.split(","))
    print(load())
    with tempfile.TemporaryDirectory(dir=base.cache_dir) as tmp:
        root = Path(tmp)
        if "aggregator" in chosen:
            for workers in (1, 2):
                bench_aggregator(base, root, workers, queries_n)
        if "learner" in chosen:
            bench_learner(base, repeats)
        if "rewriter" in chosen:
            for servers in (1, 2):
                bench_rewriter(base, root, servers, max(8, queries_n // 6))
        if "takeover" in chosen:
            bench_learner_takeover(base, root)
            bench_aggregator(base, root, 2, 0, kill=True)
    for name, value in results.items():
        print(f"{name:<64} {value:10.2f}")
    for role, one, two in (
        ("aggregator", "aggregator feedback msgs/s, 1 worker(s)", "aggregator feedback msgs/s, 2 worker(s)"),
        ("learner", "learner pairs/s, 1 process x 2 threads", "learner pairs/s, 2 gloo ranks x 1 thread"),
        ("rewriter", "rewriter queries/s, 1 process(es)", "rewriter queries/s, 2 process(es)"),
    ):
        if one in results and two in results:
            print(f"{role}: 2 processes / 1 process = {results[two] / results[one]:.2f}x")
    print(load())


if __name__ == "__main__":
    typer.run(main)
