"""Several aggregators in one Faust consumer group over 4 partitions, as real processes on the real broker.

- Two `qrloop aggregate` workers; one is killed (-9) with windows open, the other takes its partitions,
  restores their window state from the table's changelog, and every query still yields exactly one pair id.
- Two workers started at the same moment under traffic: no record arriving during the rebalances is lost.
- A worker wedged on purpose (its inputs never resume) fails /healthz once a session waits past
  `stall_after_s`, and its successor pairs the session.
- Records deleted by retention before a stopped aggregator read them: the lost range is reported and
  counted, and the aggregator reads on and commits past it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.producer.future import FutureRecordMetadata

from qrloop.catalog import Catalog
from qrloop.events import Interaction, PreferencePair, QueryEvent, SessionEnd, decode, encode
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import PAPER_SCALAR, aggregator_env, bracket_query, free_port, get

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

BEFORE_KILL, AFTER_KILL = 12, 12  # queries completed before the kill / left open across it


@pytest.fixture
def group_settings(base_settings: Settings, kafka_bootstrap: str, unique_topic: str) -> Settings:
    topics = base_settings.topics.model_copy(
        update={
            "query_events": f"{unique_topic}.q",
            "interactions": f"{unique_topic}.i",
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "query_outcomes": f"{unique_topic}.o",
            "partitions": 4,
        }
    )
    streams = base_settings.streams.model_copy(
        update={
            "app_id": f"{unique_topic}-agg",
            # Long windows: the open ones must close by their session end, after the kill, not by time.
            "attribution_window_s": 300.0,
            "grace_s": 10.0,
            "idle_advance_s": 1.0,
            "tick_s": 0.2,
            "orphan_after_s": 600.0,
            "session_timeout_s": 6.0,
        }
    )
    settings = base_settings.model_copy(update={"topics": topics, "streams": streams})
    ensure_topics(settings)
    return settings


def clicks(event: QueryEvent, n: int, start: int = 0) -> list[Interaction]:
    """Clicks on the second rewrite's own products (not the original list's): it wins clearly."""
    products = event.rewrites[1].products
    return [
        Interaction(
            event_id=f"{event.event_id}-click-{i}",
            query_event_id=event.event_id,
            rewrite_id="r2",
            product_id=products[i],
            position=i,
            kind="click",
            event_time=event.event_time + timedelta(seconds=1 + i),
        )
        for i in range(start, start + n)
    ]


def session_end(event: QueryEvent, sent: int) -> SessionEnd:
    return SessionEnd(
        query_event_id=event.event_id,
        shopper_id=event.shopper_id,
        interactions_sent=sent,
        event_time=event.event_time + timedelta(seconds=10),
    )


def assigned_partitions(log_text: str, topic: str) -> set[int]:
    """Partitions of ``topic`` this worker owns after its latest rebalance, as its log says."""
    found = re.findall(rf"assigned partitions of {re.escape(topic)}: \[([0-9, ]*)\]", log_text)
    return {int(p) for p in found[-1].split(",") if p.strip()} if found else set()


def pair_consumer(settings: Settings) -> KafkaConsumer:
    """Reads the pair topic from the start; iterating stops after half a second without a message."""
    return KafkaConsumer(
        settings.topics.preference_pairs,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )


def send_session(
    producer: KafkaProducer, settings: Settings, event: QueryEvent, partition: int | None = None
) -> FutureRecordMetadata:
    """A complete session: the query event, three clicks on its second rewrite and the session's end, all
    under the query's key (so on one partition of both topics); returns the query event's send."""
    t, key = settings.topics, event.event_id.encode()
    sent = producer.send(t.query_events, key=key, value=encode(event), partition=partition)
    for record in [*clicks(event, 3), session_end(event, 3)]:
        producer.send(t.interactions, key=key, value=encode(record), partition=partition)
    return sent


def start_aggregators(
    settings: Settings,
    tmp_path: Path,
    stagger_s: float,
    names: str = "ab",
    program: tuple[str, ...] = ("-m", "qrloop", "aggregate"),
    extra_env: dict[str, str] | None = None,
) -> tuple[dict[str, Path], dict[str, subprocess.Popen[bytes]]]:
    """Start one `qrloop aggregate` process (or ``program``) per name in one consumer group; each logs to its
    own file."""
    env = (
        aggregator_env(settings, tmp_path)
        | PAPER_SCALAR
        | {
            "QRLOOP_TOPICS__QUERY_OUTCOMES": settings.topics.query_outcomes,
            "QRLOOP_STREAMS__SESSION_TIMEOUT_S": str(settings.streams.session_timeout_s),
        }
        | (extra_env or {})
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    logs = {name: tmp_path / f"aggregator-{name}.log" for name in names}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    for name, path in logs.items():
        with path.open("wb") as sink:
            workers[name] = subprocess.Popen(
                [sys.executable, *program],
                cwd=REPO_ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        time.sleep(stagger_s)
    return logs, workers


def stall_reports(lines: list[str]) -> list[str]:
    """A worker's wedge reports (streams.progress), each with the lines logged under it."""
    reports: list[str] = []
    for i, line in enumerate(lines):
        if "no record handled on" in line or "a rebalance has lasted" in line:
            reports.append(line)
            details = ("flow", "  task", "  partition")
            reports.extend(later for later in lines[i + 1 : i + 120] if later.startswith(details))
    return reports


def read_until_paired(
    consumer: KafkaConsumer, event_id: str, log: Path, worker: subprocess.Popen[bytes]
) -> set[str]:
    """The source event ids of the pairs read until ``event_id``'s (3 minutes at most); the worker stays up"""
    paired: set[str] = set()
    deadline = time.monotonic() + 180
    while event_id not in paired and time.monotonic() < deadline:
        paired.update(decode(PreferencePair, m.value).source_event_id for m in consumer)
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
    return paired


def wait_until_ready(log: Path, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while "Worker ready" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def wait_for_stall_report(log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not stall_reports(log.read_text(errors="replace").splitlines()):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def stop_aggregators(workers: dict[str, subprocess.Popen[bytes]]) -> None:
    for worker in workers.values():
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers.values():
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_two_aggregators_share_the_stream_and_survive_a_kill(
    group_settings: Settings, tmp_path: Path
) -> None:
    """A query left open across the kill lost its pair in the last CI run and 1 of 3 full runs here, and in 3
    of 5 runs with one CPU-bound process alongside: Faust sought the taken-over inputs back to the committed
    offsets while delivering them, and skipped a record (streams.kafka_transport now pauses them for the
    seek; 6 of 6 such runs passed after)."""
    settings = group_settings
    t = settings.topics
    catalog = Catalog.open(settings)
    ids = catalog.dataset.products["product_id"].head(8).tolist()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    def send(topic: str, event: QueryEvent, value: bytes) -> None:
        producer.send(topic, key=event.event_id.encode(), value=value)

    # One joins first, the other's join rebalances the group: the usual rolling start.
    logs, workers = start_aggregators(settings, tmp_path, stagger_s=2.0)

    consumer = pair_consumer(settings)
    pairs: list[PreferencePair] = []

    def read_pairs_until(count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len({p.source_event_id for p in pairs}) < count and time.monotonic() < deadline:
            pairs.extend(decode(PreferencePair, m.value) for m in consumer)

    def shares() -> dict[str, set[int]]:
        texts = {name: path.read_text(errors="replace") for name, path in logs.items()}
        return {name: assigned_partitions(text, t.query_events) for name, text in texts.items()}

    try:
        deadline = time.monotonic() + 180
        while not all(shares().values()) and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers.values())
            time.sleep(1)
        split = shares()
        assert split["a"] and split["b"] and not split["a"] & split["b"], split
        assert split["a"] | split["b"] == {0, 1, 2, 3}, "one group: the partitions are split, not copied"

        now = datetime.now(UTC)
        done = [bracket_query(ids, now) for _ in range(BEFORE_KILL)]
        for event in done:
            send_session(producer, settings, event)
        # Open windows: the query and two of three clicks now, the rest after the kill.
        still_open = [bracket_query(ids, now) for _ in range(AFTER_KILL)]
        for event in still_open:
            send(t.query_events, event, encode(event))
            for click in clicks(event, 2):
                send(t.interactions, event, encode(click))
        producer.flush()
        read_pairs_until(BEFORE_KILL, 180)
        time.sleep(3)  # the open windows' first clicks reach the table (and its changelog)

        victim = "a"
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        for event in still_open:
            send(t.interactions, event, encode(clicks(event, 1, start=2)[0]))
            send(t.interactions, event, encode(session_end(event, 3)))
        producer.flush()
        read_pairs_until(BEFORE_KILL + AFTER_KILL, 240)
        time.sleep(3)  # anything re-emitted after the takeover arrives too
        pairs.extend(decode(PreferencePair, m.value) for m in consumer)
        survivor_log = logs["b"].read_text(errors="replace")
        assert workers["b"].poll() is None, survivor_log[-4000:]
    finally:
        consumer.close()
        producer.close()
        stop_aggregators(workers)

    # The survivor took over all four partitions.
    assert assigned_partitions(survivor_log, t.query_events) == {0, 1, 2, 3}, survivor_log[-4000:]
    # Counted on the pair topic against the query events: every query one pair id, none lost.
    by_query: dict[str, set[str]] = {}
    for p in pairs:
        by_query.setdefault(p.source_event_id, set()).add(p.pair_id)
    sent = {e.event_id for e in done + still_open}
    assert set(by_query) == sent, f"lost: {len(sent - set(by_query))}, unknown: {set(by_query) - sent}"
    assert all(len(ids_) == 1 for ids_ in by_query.values()), "a query yields at most one pair id"
    # The open windows' state survived the kill: their pairs count all three clicks, two of which were
    # consumed by the killed worker (restored from the changelog, or re-read from uncommitted offsets).
    reopened = [p for p in pairs if p.source_event_id in {e.event_id for e in still_open}]
    assert {p.chosen_components["click"] for p in reopened} == {0.75}, [p.chosen_components for p in reopened]
    duplicates = len(pairs) - len(by_query)
    print(f"{len(pairs)} pair messages for {len(by_query)} queries ({duplicates} re-emitted)")


def test_records_sent_while_the_group_forms_are_not_lost(group_settings: Settings, tmp_path: Path) -> None:
    """Two workers started at once rebalance while complete sessions keep arriving: none may be lost.

    Faust drops a record its stream takes out during a rebalance and acks it, so it was committed unread (81
    of 251 sessions lost here before streams.kafka_transport, 1 of 24 in CI). The log lines show where the
    records left uncommitted landed in each run.
    """
    settings = group_settings
    t = settings.topics
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    where: dict[str, tuple[int, int]] = {}  # query event id -> (partition, offset) of the query event

    def note_where(event: QueryEvent, sent: FutureRecordMetadata) -> None:
        sent.add_callback(lambda meta: where.__setitem__(event.event_id, (meta.partition, meta.offset)))

    def shares() -> list[set[int]]:
        return [
            assigned_partitions(path.read_text(errors="replace"), t.query_events) for path in logs.values()
        ]

    sent: list[QueryEvent] = []
    # A worker that stops handling its partitions (after 20 s) or whose rebalance hangs (after 30 s) says so,
    # with each partition's state and where its tasks wait (streams.progress). One CI run lost a worker's
    # records without a word; a run here showed its table's recovery waiting for changelog records that never
    # came ("No event received for active tp ... since recovery start"), minutes after the rebalance.
    stall_env = {"QRLOOP_STREAMS__STALL_AFTER_S": "20", "QRLOOP_STREAMS__REBALANCE_STALL_AFTER_S": "30"}
    logs, workers = start_aggregators(settings, tmp_path, stagger_s=0.0, extra_env=stall_env)
    consumer = pair_consumer(settings)
    paired: set[str] = set()
    try:
        # Ten sessions a second from the workers' start until ten seconds after both own partitions.
        settled_at: float | None = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (settled_at is None or time.monotonic() < settled_at + 10):
            event = bracket_query(ids, datetime.now(UTC))
            note_where(event, send_session(producer, settings, event))
            sent.append(event)
            time.sleep(0.1)
            if settled_at is None and all(shares()):
                settled_at = time.monotonic()
        producer.flush()
        assert settled_at is not None, "the two workers never both owned partitions"
        deadline = time.monotonic() + 180
        while len(paired) < len(sent) and time.monotonic() < deadline:
            paired.update(decode(PreferencePair, m.value).source_event_id for m in consumer)
            assert all(w.poll() is None for w in workers.values())
    finally:
        consumer.close()
        producer.close()
        stop_aggregators(workers)
    lost = sorted(where[e.event_id] for e in sent if e.event_id not in paired)
    for name, path in logs.items():
        marks = ("fetched during a rebalance", "nothing committed yet")
        lines = path.read_text().splitlines()
        reread = [line.split("] ")[-1] for line in lines if any(m in line for m in marks)]
        print(f"worker {name}: " + ("; ".join(reread) or "no record re-read"))
        print("\n".join(stall_reports(lines)) or f"worker {name}: no partition stalled")
    print(f"{len(sent)} sessions, {len(paired)} paired; lost (partition, offset): {lost}")
    assert not lost, f"{len(lost)} of {len(sent)} queries lost at (partition, offset) {lost}"


def test_records_deleted_before_the_aggregator_read_them_are_reported(
    group_settings: Settings, tmp_path: Path
) -> None:
    """Retention removes query events the stopped aggregator had not read: on restart it says which offsets of
    which partition were lost (as the learner does) instead of aiokafka's silent reset, then reads on."""
    settings = group_settings
    t = settings.topics
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    def send_sessions(n: int) -> list[QueryEvent]:
        """n sessions, dealt round the partitions (each session's records on one partition of both topics)."""
        events = [bracket_query(ids, datetime.now(UTC)) for _ in range(n)]
        for i, event in enumerate(events):
            send_session(producer, settings, event, partition=i % t.partitions)
        producer.flush()
        return events

    consumer = pair_consumer(settings)
    paired: set[str] = set()

    def read_pairs_until(wanted: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not wanted <= paired and time.monotonic() < deadline:
            paired.update(decode(PreferencePair, m.value).source_event_id for m in consumer)

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    offsets = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers)  # to read log ends
    try:
        first = send_sessions(8)
        logs, workers = start_aggregators(settings, tmp_path / "first", stagger_s=0.0, names="a")
        read_pairs_until({e.event_id for e in first}, 180)
        stop_aggregators(workers)  # a clean stop commits what was read
        assert {e.event_id for e in first} <= paired
        # While it is down: 8 more sessions, then retention removes every query event not yet read.
        unread = send_sessions(8)
        partitions = [TopicPartition(t.query_events, p) for p in range(t.partitions)]
        deleted_to = offsets.end_offsets(partitions)
        admin.delete_records(dict(deleted_to.items()))
        after = send_sessions(4)
        logs, workers = start_aggregators(settings, tmp_path / "second", stagger_s=0.0, names="a")
        read_pairs_until({e.event_id for e in after}, 180)
        stop_aggregators(workers)
        ends = offsets.end_offsets(partitions)
        group = admin.list_consumer_group_offsets(settings.streams.app_id, partitions=partitions)
        committed = {tp: meta.offset for tp, meta in group.items()}
    finally:
        admin.close()
        offsets.close()
        consumer.close()
        producer.close()
    log_text = logs["a"].read_text(errors="replace")
    lost_range = rf"{re.escape(t.query_events)}\[(\d)\]: records (\d+)\.\.(\d+) \((\d+)\) were deleted"
    reported = re.findall(lost_range, log_text)
    print(f"lost ranges reported (partition, first, last, count): {reported}")
    lost_per_partition = sorted((int(p), int(count)) for p, *_, count in reported)
    assert lost_per_partition == [(p, 2) for p in range(4)], log_text[-3000:]
    assert {e.event_id for e in after} <= paired, "the sessions sent after the loss are paired"
    assert not {e.event_id for e in unread} & paired, "the deleted query events never reached a window"
    # Read on and committed past the loss: left stale, Faust's committed offset makes the first record read
    # look like one after a gap, and the partition can stop committing (1 of 4 in a full-suite run).
    assert all(ends[tp] > deleted_to[tp] for tp in partitions), "a later session on every partition"
    assert committed == ends, (committed, ends)


# `qrloop aggregate`, with a spy on the real seek after each rebalance: it prints which partitions the worker
# was delivering at that moment, then seeks (the worker, broker and group are the real ones).
SEEK_SPY = """
from qrloop.cli.main import aggregate
from streams.kafka_transport import RebalanceSafeConsumer

seek = RebalanceSafeConsumer.seek_to_committed

async def seek_and_say(self):
    delivering = sorted(f"{tp.topic}[{tp.partition}]" for tp in self._get_active_partitions())
    print("seeking while delivering: " + " ".join(delivering), flush=True)
    return await seek(self)

RebalanceSafeConsumer.seek_to_committed = seek_and_say
aggregate()
"""


def test_the_seek_after_a_rebalance_runs_with_the_inputs_paused(
    group_settings: Settings, tmp_path: Path
) -> None:
    """Faust resumes the inputs before it seeks them, so records were delivered while the seek moved the read
    position under them (a click skipped, a session end read twice: the kill test's lost pair). Ours seeks
    with them paused, and delivers them again after."""
    settings = group_settings
    t = settings.topics
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    logs, workers = start_aggregators(settings, tmp_path, stagger_s=0.0, names="a", program=("-c", SEEK_SPY))
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    consumer = pair_consumer(settings)
    try:
        event = bracket_query(ids, datetime.now(UTC))
        send_session(producer, settings, event)
        producer.flush()
        paired = read_until_paired(consumer, event.event_id, logs["a"], workers["a"])
    finally:
        consumer.close()
        producer.close()
        stop_aggregators(workers)
    log_text = logs["a"].read_text(errors="replace")
    seeks = re.findall(r"seeking while delivering: (.*)", log_text)
    print(f"{len(seeks)} seeks; delivering during the first: {seeks[0] if seeks else None}")
    inputs = (t.query_events, t.interactions, f"{settings.streams.app_id}-closes")
    assert seeks, log_text[-3000:]
    assert not [tp for line in seeks for tp in line.split() if tp.rsplit("[", 1)[0] in inputs], seeks
    assert event.event_id in paired, "after the seek the inputs are delivered again"


# `qrloop aggregate` wedged on purpose: after each seek that follows a rebalance its inputs stay paused (as if
# Faust never resumed them), so it handles nothing more while its process, event loop and agents live on.
WEDGED = """
from qrloop.cli.main import aggregate
from streams.kafka_transport import RebalanceSafeConsumer

seek = RebalanceSafeConsumer.perform_seek

async def seek_and_wedge(self):
    await seek(self)
    self.pause_partitions({tp for tp in self.assignment() if tp.topic in self.app.topics.acking_topics})

RebalanceSafeConsumer.perform_seek = seek_and_wedge
aggregate()
"""


def test_a_worker_that_stops_handling_its_records_fails_healthz_and_its_successor_pairs_them(
    group_settings: Settings, tmp_path: Path
) -> None:
    """The wedge check (streams.progress) on the real broker: a worker whose inputs never resume stays
    healthy while nothing waits, reports the partition once a session waits unhandled past
    ``stall_after_s``, and fails /healthz (its supervisor would restart it); a worker started after it reads
    the waiting session from the committed offsets and pairs it."""
    settings = group_settings
    t = settings.topics
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    port = free_port()
    env = {
        "QRLOOP_STREAMS__STALL_AFTER_S": "4",
        "QRLOOP_STREAMS__METRICS_PORT": str(port),
        "QRLOOP_DAEMON__LIVENESS_MAX_AGE_S": "2",
    }
    logs, workers = start_aggregators(
        settings, tmp_path / "wedged", stagger_s=0.0, names="a", program=("-c", WEDGED), extra_env=env
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    event = bracket_query(ids, datetime.now(UTC))
    try:
        wait_until_ready(logs["a"], workers["a"])
        time.sleep(8)  # twice the stall limit with nothing waiting
        quiet_status, _ = get(f"http://127.0.0.1:{port}/healthz")
        send_session(producer, settings, event, partition=1)
        producer.flush()
        wait_for_stall_report(logs["a"], timeout_s=60)
        time.sleep(3)  # past the heartbeat's 2 s
        wedged_status, wedged_body = get(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop_aggregators(workers)
    lines = logs["a"].read_text(errors="replace").splitlines()
    reports = stall_reports(lines)
    print("\n".join(reports[:12]))
    print(f"/healthz: {quiet_status} while nothing waited, {wedged_status} with the session waiting")
    assert quiet_status == 200, "caught up and quiet is not a stall"
    assert reports, "\n".join(lines[-60:])
    assert f"{t.query_events}[1] (records 0..0 waiting" in reports[0], reports[0]
    assert any(line.startswith("flow") and f"{t.query_events}[1]" in line for line in reports), "its pause"
    assert any(line.startswith("  task ") for line in reports), "where the tasks wait"
    assert wedged_status == 503, wedged_body

    consumer = pair_consumer(settings)
    logs, workers = start_aggregators(settings, tmp_path / "successor", stagger_s=0.0, names="b")
    try:
        paired = read_until_paired(consumer, event.event_id, logs["b"], workers["b"])
    finally:
        consumer.close()
        producer.close()
        stop_aggregators(workers)
    assert event.event_id in paired, "the waiting session was never committed: the successor pairs it"


# `qrloop aggregate` whose rebalances after the first never end: the seek that follows the table's recovery
# hangs (as Faust's recovery did when its changelog partitions delivered nothing), so the flow never resumes.
# A first rebalance that hangs is caught by the heartbeat: Faust starts the timer that beats it after that.
HUNG_REBALANCE = """
import asyncio
from qrloop.cli.main import aggregate
from streams.kafka_transport import RebalanceSafeConsumer

seek, seeks = RebalanceSafeConsumer.perform_seek, []

async def seek_once_then_hang(self):
    seeks.append(1)
    if len(seeks) > 1:
        await asyncio.sleep(3600)
    await seek(self)

RebalanceSafeConsumer.perform_seek = seek_once_then_hang
aggregate()
"""


def test_a_worker_whose_rebalance_never_ends_reports_it_and_fails_healthz(
    group_settings: Settings, tmp_path: Path
) -> None:
    """A rebalance that outlasts ``streams.rebalance_stall_after_s`` is a wedge too: when a second worker
    joins, the first worker's rebalance hangs; it logs that with each partition's state and where its tasks
    wait, and /healthz fails so that its supervisor restarts it."""
    settings = group_settings
    t = settings.topics
    port = free_port()
    env = {
        "QRLOOP_STREAMS__REBALANCE_STALL_AFTER_S": "5",
        "QRLOOP_STREAMS__STALL_AFTER_S": "4",
        "QRLOOP_STREAMS__METRICS_PORT": str(port),
        "QRLOOP_DAEMON__LIVENESS_MAX_AGE_S": "2",
    }
    logs, workers = start_aggregators(
        settings, tmp_path / "hung", stagger_s=0.0, names="a", program=("-c", HUNG_REBALANCE), extra_env=env
    )
    joined: dict[str, subprocess.Popen[bytes]] = {}
    try:
        wait_until_ready(logs["a"], workers["a"])
        ready_status, _ = get(f"http://127.0.0.1:{port}/healthz")
        _, joined = start_aggregators(settings, tmp_path / "joining", stagger_s=0.0, names="b")
        wait_for_stall_report(logs["a"], timeout_s=180)
        time.sleep(3)  # past the heartbeat's 2 s
        status, body = get(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop_aggregators(workers | joined)
    reports = stall_reports(logs["a"].read_text(errors="replace").splitlines())
    print("\n".join(reports[:24]))
    print(f"/healthz: {ready_status} after the first rebalance, {status} in the hung one")
    assert ready_status == 200
    assert "a rebalance has lasted" in reports[0], reports[0]
    partitions = [line for line in reports if line.startswith("  partition ")]
    assert any(f"{t.query_events}[" in line and "fetch position" in line for line in partitions), partitions
    # Which task shows the hung seek depends on who sought first (recovery, or Faust's fetcher meanwhile).
    assert any(line.startswith("  task ") for line in reports), "where the tasks wait"
    assert status == 503, body
