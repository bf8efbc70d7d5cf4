"""The Faust aggregator under faults, through the real broker: records the decoder used to let through, event
times far from the clock (which moved the watermark), a product the catalog does not know (which closed the
same window at every tick), and the attribution window's clock-skew allowance. One worker serves every test
of the module; each test sends its own queries and waits for its own results."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.errors import KafkaTimeoutError
from kafka import KafkaConsumer, KafkaProducer

from qrloop.catalog import Catalog
from qrloop.events import (
    DeadLetter,
    Interaction,
    PreferencePair,
    QueryEvent,
    QueryOutcome,
    SessionEnd,
    decode,
    encode,
)
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from streams import attribution
from streams.aggregator import until_the_broker_takes_it
from tests.faults.conftest import private_topics
from tests.helpers import aggregator_env, bracket_query, interaction, unique_topic_name


@dataclass
class Worker:
    settings: Settings
    process: subprocess.Popen[bytes]
    log: Path
    producer: KafkaProducer
    consumer: KafkaConsumer
    pairs: dict[str, PreferencePair]
    scored: set[str]  # query event ids with an outcome (every scored query, ties included)
    letters: list[DeadLetter]
    ids: list[str]  # real catalog product ids

    def send(self, topic: str, key: str, value: bytes) -> None:
        self.producer.send(topic, key=key.encode(), value=value)
        self.producer.flush()

    def collect(self) -> None:
        for message in self.consumer:
            if message.topic == self.settings.topics.preference_pairs:
                pair = decode(PreferencePair, message.value)
                self.pairs[pair.source_event_id] = pair
            elif message.topic == self.settings.topics.query_outcomes:
                self.scored.add(decode(QueryOutcome, message.value).query_event_id)
            else:
                self.letters.append(decode(DeadLetter, message.value))

    def wait(self, done: object, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            self.collect()
            if callable(done) and done():
                return
        raise AssertionError(f"timed out; dead letters {[x.reason for x in self.letters]}")

    def letters_for(self, raw: bytes) -> list[str]:
        return [x.reason for x in self.letters if x.original_bytes() == raw]


def fault_settings(base_settings: Settings, prefix: str) -> Settings:
    """Private topics and an app of their own, with windows short enough for a test."""
    settings = private_topics(base_settings, prefix)
    return settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"partitions": 2}),
            "streams": settings.streams.model_copy(
                update={
                    "app_id": f"{prefix}-agg",
                    "attribution_window_s": 5.0,
                    "grace_s": 1.0,
                    "idle_advance_s": 1.0,
                    "tick_s": 0.2,
                    "orphan_after_s": 3.0,
                }
            ),
        }
    )


def catalog_ids(settings: Settings) -> list[str]:
    """Eight real catalog product ids, for the lists of the test queries."""
    return list(Catalog.open(settings).dataset.products["product_id"].head(8).tolist())


def worker_env(settings: Settings, folder: Path) -> dict[str, str]:
    outcomes = settings.topics.query_outcomes
    return aggregator_env(settings, folder) | {"QRLOOP_TOPICS__QUERY_OUTCOMES": outcomes}


def start_worker(settings: Settings, folder: Path) -> Worker:
    log = folder / "aggregator.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=worker_env(settings, folder),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    t = settings.topics
    consumer = KafkaConsumer(
        t.preference_pairs,
        t.query_outcomes,
        t.dead_letter,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=300,
    )
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    return Worker(settings, process, log, producer, consumer, {}, set(), [], catalog_ids(settings))


def stop(w: Worker) -> None:
    w.consumer.close()
    w.producer.close()
    w.process.terminate()
    w.process.wait(timeout=60)


@pytest.fixture(scope="module")
def worker(
    base_settings: Settings, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    settings = fault_settings(base_settings, unique_topic_name())
    ensure_topics(settings)
    w = start_worker(settings, tmp_path_factory.mktemp("agg"))
    yield w
    stop(w)


def session_closed(
    settings: Settings, event: QueryEvent, raw: bytes | None = None
) -> list[tuple[str, str, bytes]]:
    """(topic, key, value) of a query whose session ends without an interaction: its event, its SessionEnd."""
    t = settings.topics
    end = SessionEnd(
        query_event_id=event.event_id, shopper_id="s1", interactions_sent=0, event_time=event.event_time
    )
    return [
        (t.query_events, event.event_id, raw if raw is not None else encode(event)),
        (t.interactions, event.event_id, encode(end)),
    ]


def closed_with_session_end(w: Worker, event: QueryEvent, raw: bytes | None = None) -> None:
    for topic, key, value in session_closed(w.settings, event, raw):
        w.send(topic, key, value)


def test_poison_records_are_dead_lettered_and_the_stream_goes_on(worker: Worker) -> None:
    w, t = worker, worker.settings.topics
    valid = encode(bracket_query(w.ids, datetime.now(UTC))).decode()
    poison = {
        "huge_number": valid.replace('"logprob":-3.0', '"logprob":' + "7" * 6000).encode(),
        "deep_nesting": valid.replace(
            '"original_products":[', '"original_products":[' + "[" * 6000 + "]" * 6000 + ",", 1
        ).encode(),
        "year_9999_offset": valid.replace(
            valid.split('"event_time":"')[1].split('"')[0], "9999-12-31T23:59:59-05:00"
        ).encode(),
        "bad_utf8": valid.encode().replace(b"angle bracket", b"angle \xff\xfe bracket", 1),
    }
    for name, raw in poison.items():
        w.send(t.query_events, name, raw)
    w.send(
        t.interactions,
        "deep",
        b'{"schema_version": 1, "type": "interaction", "x": ' + b"[" * 6000 + b"]" * 6000 + b"}",
    )
    after = bracket_query(w.ids, datetime.now(UTC))
    closed_with_session_end(w, after)
    w.wait(lambda: after.event_id in w.scored and all(w.letters_for(raw) for raw in poison.values()), 240)
    landed = {name: w.letters_for(raw) for name, raw in poison.items()}
    assert landed == {
        "huge_number": ["malformed_json"],
        "deep_nesting": ["malformed_json"],
        "year_9999_offset": ["invalid_schema"],
        "bad_utf8": ["malformed_json"],
    }, landed
    assert after.event_id in w.scored, "a valid query after the poison is still scored"


def test_event_times_far_from_the_clock_are_dead_lettered_and_leave_the_watermark(worker: Worker) -> None:
    w, t = worker, worker.settings.topics
    now = datetime.now(UTC)
    future = bracket_query(w.ids, datetime(9999, 12, 31, tzinfo=UTC))
    past = bracket_query(w.ids, now - timedelta(days=30))
    w.send(t.query_events, future.event_id, encode(future))
    w.send(t.query_events, past.event_id, encode(past))
    live = bracket_query(w.ids, datetime.now(UTC))
    w.send(t.query_events, live.event_id, encode(live))
    # With the watermark at 9999 the window would close at the next tick, without the clicks below.
    time.sleep(2.5)
    clicks = [interaction(live, "r2", p, "click", 1) for p in live.rewrites[1].products[1:]]
    clicks.append(interaction(live, "r2", live.rewrites[1].products[0], "click", -1.0))  # 1 s clock skew
    for click in clicks:
        w.send(t.interactions, live.event_id, encode(click))
    w.wait(lambda: live.event_id in w.pairs)
    assert w.letters_for(encode(future)) == ["event_time_out_of_range"]
    assert w.letters_for(encode(past)) == ["event_time_out_of_range"]
    pair = w.pairs[live.event_id]
    assert pair.chosen == live.rewrites[1].text
    assert pair.chosen_components["click"] == 1.0, "all four clicks counted, the skewed one included"
    assert not {future.event_id, past.event_id} & (set(w.pairs) | w.scored)


def test_an_unknown_product_is_dead_lettered_once_and_its_window_closed(worker: Worker) -> None:
    w = worker
    ghost = bracket_query(w.ids, datetime.now(UTC))
    ghost = ghost.model_copy(
        update={
            "rewrites": [
                ghost.rewrites[0],
                ghost.rewrites[1].model_copy(update={"products": ["no-such-product"]}),
            ]
        }
    )
    closed_with_session_end(w, ghost)
    after = bracket_query(w.ids, datetime.now(UTC))
    closed_with_session_end(w, after)
    w.wait(lambda: after.event_id in w.scored and any(x.reason == "unknown_product" for x in w.letters))
    time.sleep(3)  # a dozen ticks: the window is not closed again
    w.collect()
    unknown = [x for x in w.letters if x.reason == "unknown_product"]
    assert len(unknown) == 1 and ghost.event_id in unknown[0].original_bytes().decode()
    assert ghost.event_id not in w.pairs and ghost.event_id not in w.scored


def test_the_attribution_window_allows_a_small_clock_skew() -> None:
    t0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
    event = bracket_query([f"p{i}" for i in range(8)], t0)
    early = interaction(event, "r1", "p4", "click", -1.5)
    for skew, expected in ((0.0, "outside_window"), (2.0, "counted")):
        state = attribution.apply_query(attribution.new_state(now_wall=0.0), event, 30.0, skew)
        assert attribution.apply_interaction(state, early, 30.0, skew) == expected
        waiting = attribution.new_state(now_wall=0.0)  # the click first, its query later
        attribution.apply_interaction(waiting, early, 30.0, skew)
        attribution.apply_query(waiting, event, 30.0, skew)
        assert len(waiting["seen"]) == (1 if expected == "counted" else 0)
    too_early = interaction(event, "r1", "p4", "click", -3.0)
    state = attribution.apply_query(attribution.new_state(now_wall=0.0), event, 30.0, 2.0)
    assert attribution.apply_interaction(state, too_early, 30.0, 2.0) == "outside_window"
    assert isinstance(early, Interaction)


def test_a_record_whose_send_the_broker_refuses_is_handled_again_until_it_goes_through() -> None:
    """A broker error used to end the agent's iteration, and Faust acks a batch whose iteration ends: with
    batches of up to 256 records, every record after the failed one would have been committed unread."""
    tries: list[int] = []
    pauses: list[float] = []

    async def handle() -> None:
        tries.append(len(tries))
        if len(tries) <= 4:
            raise KafkaTimeoutError("the broker took too long")

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    asyncio.run(until_the_broker_takes_it(handle, "q[0]@7", first_pause_s=0.5, max_pause_s=2.0, sleep=sleep))
    assert len(tries) == 5 and pauses == [0.5, 1.0, 2.0, 2.0]

    async def broken() -> None:
        raise ValueError("the record's fault: dead-lettered by the agent, never retried")

    with pytest.raises(ValueError):
        asyncio.run(until_the_broker_takes_it(broken, "q[0]@8", sleep=sleep))
    assert len(pauses) == 4


def test_no_agent_crashed(worker: Worker) -> None:
    """After everything above: the worker is the one started first and Faust never restarted an agent."""
    assert worker.process.poll() is None
    assert "Crashed" not in worker.log.read_text(), worker.log.read_text()[-4000:]


def test_a_worker_whose_m1_cannot_load_stops_before_consuming_and_loses_nothing(
    base_settings: Settings, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """M1 used to load on the first window: when it could not, that valid query was dead-lettered
    ("unprocessable"), and its close request again at every tick. Now the worker loads M1 before it consumes,
    and one that cannot stops with the reason; the query waits in its topic for a worker that can score it."""
    settings = fault_settings(base_settings, unique_topic_name())
    ensure_topics(settings)
    event = bracket_query(catalog_ids(settings), datetime.now(UTC))
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for topic, key, value in session_closed(settings, event):
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()

    missing = tmp_path / "no-encoder"
    failed = subprocess.run(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=worker_env(settings, tmp_path) | {"QRLOOP_MODELS__ENCODER_DIR": str(missing)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "cannot score without its relevance model M1" in failed.stdout + failed.stderr

    w = start_worker(settings, tmp_path)
    try:
        w.wait(lambda: event.event_id in w.scored, 240)
        assert w.letters == [], [(x.reason, x.error) for x in w.letters]
    finally:
        stop(w)
