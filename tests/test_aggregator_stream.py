"""The Faust aggregator through the real broker: rewards against hand-computed values, duplicates,
out-of-order and orphaned feedback, ties, time-based closing, and bad messages dead-lettered while the
stream goes on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from qrloop import rewards
from qrloop.catalog import Catalog
from qrloop.events import (
    DeadLetter,
    PreferencePair,
    SessionEnd,
    decode,
    encode,
    pair_id_for,
)
from qrloop.relevance import RelevanceModel
from qrloop.runs import isolate
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from tests.helpers import PAPER_SCALAR, aggregator_env, bracket_query, interaction, wait_for

WINDOW_S = 5.0
GRACE_S = 1.0


@pytest.fixture
def stream_settings(base_settings: Settings, kafka_bootstrap: str, unique_topic: str) -> Settings:
    settings = isolate(base_settings, unique_topic, None)
    topics = settings.topics.model_copy(update={"partitions": 2})
    streams = settings.streams.model_copy(
        update={
            "attribution_window_s": WINDOW_S,
            "grace_s": GRACE_S,
            "idle_advance_s": 1.0,
            "tick_s": 0.2,
            "orphan_after_s": 3.0,
        }
    )
    settings = settings.model_copy(update={"topics": topics, "streams": streams})
    ensure_topics(settings)
    return settings


def test_aggregator_through_the_real_stream(stream_settings: Settings, tmp_path: Path) -> None:
    settings = stream_settings
    catalog = Catalog.open(settings)
    ids = catalog.dataset.products["product_id"].head(8).tolist()
    now = datetime.now(UTC)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    t = settings.topics

    def send(topic: str, key: str, value: bytes) -> None:
        producer.send(topic, key=key.encode(), value=value)

    # Q1: complete feedback; one interaction arrives before its query event, one is duplicated.
    q1 = bracket_query(ids, now)
    e, f, g, a = ids[4], ids[5], ids[6], ids[0]
    q1_feedback = [
        interaction(q1, "r1", e, "click", 1),
        interaction(q1, "r1", e, "add_to_cart", 2),
        interaction(q1, "r1", e, "purchase", 3),
        interaction(q1, "r1", f, "click", 1.5),
        interaction(q1, "r2", a, "click", 1),
        interaction(q1, "r2", g, "click", 1),  # g is not in r2's list: not attributable to r2
    ]
    send(t.interactions, q1.event_id, encode(q1_feedback[0]))  # before the query event
    # Bad messages on both inputs: they must be dead-lettered and the stream must go on.
    send(t.query_events, "bad-1", b"{not json")
    send(t.interactions, "bad-2", b'{"schema_version": 1, "type": "interaction", "kind": "stare"}')
    send(t.query_events, q1.event_id, encode(q1))
    for item in [*q1_feedback[1:], q1_feedback[1]]:  # the add-to-cart is delivered twice
        send(t.interactions, q1.event_id, encode(item))
    end = SessionEnd(
        query_event_id=q1.event_id,
        shopper_id="s1",
        interactions_sent=len(q1_feedback),
        event_time=now + timedelta(seconds=4),
    )
    send(t.interactions, q1.event_id, encode(end))

    # Q2: both rewrites retrieve the same list and nobody clicks: a tie, never emitted.
    same = ids[0:4]
    q2 = bracket_query(ids, now, ("angle bracket steel", "steel angle bracket"), (same, same, same))
    send(t.query_events, q2.event_id, encode(q2))
    send(
        t.interactions,
        q2.event_id,
        encode(SessionEnd(query_event_id=q2.event_id, shopper_id="s1", interactions_sent=0, event_time=now)),
    )

    # Q3: no session end: closed by the watermark once the window and the grace have passed.
    q3 = bracket_query(ids, now)
    send(t.query_events, q3.event_id, encode(q3))
    for product in q3.rewrites[1].products[1:]:  # r2 clearly better: three of its four products clicked
        send(t.interactions, q3.event_id, encode(interaction(q3, "r2", product, "click", 1)))

    # An orphan: feedback for a query event that never comes.
    ghost = bracket_query(ids, now)
    send(t.interactions, ghost.event_id, encode(interaction(ghost, "r1", e, "click", 1)))
    producer.flush()

    log = (tmp_path / "aggregator.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=aggregator_env(settings, tmp_path) | PAPER_SCALAR,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pairs: dict[str, PreferencePair] = {}
    letters: list[DeadLetter] = []
    consumer = KafkaConsumer(
        t.preference_pairs,
        t.dead_letter,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(pairs) < 2 or len(letters) < 3):
            assert worker.poll() is None, (tmp_path / "aggregator.log").read_text()[-4000:]
            for message in consumer:
                if message.topic == t.preference_pairs:
                    pair = decode(PreferencePair, message.value)
                    pairs[pair.source_event_id] = pair
                else:
                    letters.append(decode(DeadLetter, message.value))
        # A late click for the closed Q1 and a re-delivered query event must not produce anything new.
        producer.send(
            t.interactions, key=q1.event_id.encode(), value=encode(interaction(q1, "r2", a, "add_to_cart", 2))
        )
        producer.send(t.query_events, key=q1.event_id.encode(), value=encode(q1))
        producer.flush()
        time.sleep(3)
        extra = [decode(PreferencePair, m.value) for m in consumer if m.topic == t.preference_pairs]
    finally:
        consumer.close()
        producer.close()
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
    log_text = (tmp_path / "aggregator.log").read_text()

    seen = {"q1": q1.event_id in pairs, "q3": q3.event_id in pairs, "q2": q2.event_id in pairs}
    summary = f"pairs seen {seen}, dead letters {[x.reason for x in letters]}\n"
    assert set(pairs) == {q1.event_id, q3.event_id}, summary + log_text[-3000:]
    assert q2.event_id not in pairs, "a tie is never emitted"
    assert extra == [], "late and re-delivered events change nothing"

    # Hand-computed components for Q1 (relevance from the same M1 the aggregator loads).
    m1 = RelevanceModel.load(settings)

    def scores(products: list[str]) -> list[float]:
        return list(m1.score(q1.query, [catalog.text(p) for p in products]))

    def relevance_of(products: list[str]) -> float:
        return rewards.relevance(scores(products))

    # Gain terms at τ = 0: novelty = Σ M1 of the new products / 4; engagement = stages on new products / 3 / 4
    # (r1: e clicked, carted, bought and f clicked = 4 stages; r2: its click on a is on an original product).
    r1 = rewards.RewardComponents(
        relevance_of(q1.rewrites[0].products),
        0.75,
        2 / 4,
        1 / 4,
        1 / 4,
        sum(scores([e, f, g])) / 4,
        4 / 3 / 4,
    )
    r2 = rewards.RewardComponents(
        relevance_of(q1.rewrites[1].products), 1 / 4, 1 / 4, 0.0, 0.0, sum(scores([ids[7]])) / 4, 0.0
    )
    p1 = pairs[q1.event_id]
    assert p1.pair_id == pair_id_for(q1.event_id)
    assert (p1.chosen, p1.rejected) == ("metal angle bracket", "bracket")
    for name, value in r1.as_dict().items():
        assert p1.chosen_components[name] == pytest.approx(value, abs=1e-6), name
    for name, value in r2.as_dict().items():
        assert p1.rejected_components[name] == pytest.approx(value, abs=1e-6), name
    paper = settings.rewards.model_copy(update={"ranking": "paper"})
    assert p1.chosen_reward == pytest.approx(r1.combined(paper), abs=1e-6)
    assert p1.policy_version == 7

    reasons = sorted(letter.reason for letter in letters)
    assert reasons == ["invalid_schema", "malformed_json", "orphan_interaction"], reasons
    malformed = next(x for x in letters if x.reason == "malformed_json")
    assert base64.b64decode(malformed.original) == b"{not json"
    assert malformed.source_topic == t.query_events


def test_a_windows_records_handled_together_are_written_to_its_changelog_once(
    stream_settings: Settings, tmp_path: Path
) -> None:
    """Faust writes a table's changelog at every assignment: a query's window was written once per feedback
    record (JSON of the whole window and a produce each, about 45% of an unscored worker's time). Records
    handled as one batch now write each window once, and that write holds every record of the batch."""
    streams = stream_settings.streams.model_copy(update={"attribution_window_s": 300.0})
    settings = stream_settings.model_copy(update={"streams": streams})  # open for the whole test
    t = settings.topics
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    query = bracket_query(ids, datetime.now(UTC))
    kinds = ("click", "add_to_cart", "purchase")
    every = [(r.rewrite_id, p, k) for r in query.rewrites for p in r.products for k in kinds]
    feedback = [
        interaction(query, rewrite, product, kind, 1 + i) for i, (rewrite, product, kind) in enumerate(every)
    ]
    assert len(feedback) == 24
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    key = query.event_id.encode()
    producer.send(t.query_events, key=key, value=encode(query))
    for item in feedback:  # all waiting before the worker starts: its first batches take them together
        producer.send(t.interactions, key=key, value=encode(item))
    producer.flush()
    producer.close()

    changelog = f"{settings.streams.app_id}-windows-changelog"
    log = (tmp_path / "aggregator.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=aggregator_env(settings, tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    writes: list[dict] = []

    def all_written() -> bool:
        assert worker.poll() is None, (tmp_path / "aggregator.log").read_text()[-4000:]
        writes[:] = window_writes(settings, changelog, query.event_id)
        return bool(writes) and len(writes[-1]["seen"]) == len(feedback)

    try:
        wait_for(all_written, 120, "every interaction in the window's changelog", tmp_path / "aggregator.log")
        time.sleep(2)  # any further write of the window would be there by now
        writes = window_writes(settings, changelog, query.event_id)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
    print(f"{len(writes)} changelog writes of the window for 1 query event and {len(feedback)} interactions")
    assert writes and len(writes[-1]["seen"]) == len(feedback), "every record reached the changelog"
    # The query event's batch and the feedback's, with room for a fetch that split the 24 records.
    assert len(writes) <= 4, [len(w["seen"]) for w in writes]


def window_writes(settings: Settings, changelog: str, key: str) -> list[dict]:
    """The values written to the window table's changelog for ``key``, in order (none before it exists)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
    )
    try:
        partitions = consumer.partitions_for_topic(changelog)
        if not partitions:
            return []
        consumer.assign([TopicPartition(changelog, p) for p in sorted(partitions)])
        # Faust encodes the table's keys and values as JSON.
        return [json.loads(m.value) for m in consumer if json.loads(m.key) == key and m.value is not None]
    finally:
        consumer.close()
