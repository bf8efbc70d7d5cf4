"""Several aggregators: two `qrloop aggregate` workers form one Faust consumer group over 4 partitions; one is
killed (-9) with windows open, the other takes its partitions, restores their window state from the table's
changelog, and every query still yields exactly one pair id (none lost, none doubled)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from qrloop.catalog import Catalog
from qrloop.events import Interaction, PreferencePair, QueryEvent, SessionEnd, decode, encode
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import PAPER_SCALAR, aggregator_env, bracket_query

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


def test_two_aggregators_share_the_stream_and_survive_a_kill(
    group_settings: Settings, tmp_path: Path
) -> None:
    settings = group_settings
    t = settings.topics
    catalog = Catalog.open(settings)
    ids = catalog.dataset.products["product_id"].head(8).tolist()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    def send(topic: str, event: QueryEvent, value: bytes) -> None:
        producer.send(topic, key=event.event_id.encode(), value=value)

    env = (
        aggregator_env(settings, tmp_path)
        | PAPER_SCALAR
        | {
            "QRLOOP_TOPICS__QUERY_OUTCOMES": t.query_outcomes,
            "QRLOOP_STREAMS__SESSION_TIMEOUT_S": str(settings.streams.session_timeout_s),
        }
    )
    logs = {name: tmp_path / f"aggregator-{name}.log" for name in "ab"}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    for name, path in logs.items():
        with path.open("wb") as sink:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "qrloop", "aggregate"],
                cwd=REPO_ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        time.sleep(2)  # one joins first, the other's join rebalances the group: the usual rolling start

    consumer = KafkaConsumer(
        t.preference_pairs,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )
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
            send(t.query_events, event, encode(event))
            for click in clicks(event, 3):
                send(t.interactions, event, encode(click))
            send(t.interactions, event, encode(session_end(event, 3)))
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
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

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
