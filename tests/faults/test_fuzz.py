"""10,000 generated invalid messages on each input topic, through the real broker (SQLite store):

- ``query-events`` and ``interactions`` into the Faust aggregator (a subprocess),
- ``preference-pairs`` into the learner, ``query-outcomes`` into the canary job, ``policy-versions`` into the
  rewriter's announcement follower (in this process, with the tiny policy).

Every message must end in the dead-letter topic with a reason (the follower, which does not own its topic,
counts them as ignored instead), no role may crash, and a valid event sent after them must still be
processed. The counts per topic, category and reason are printed (run with ``-s``)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import REGISTRY

from learner.worker import build
from policy_store import db
from qrloop.canary_job import CanaryJob
from qrloop.catalog import Catalog
from qrloop.events import (
    DeadLetter,
    Interaction,
    PolicyAnnouncement,
    PreferencePair,
    QueryEvent,
    QueryOutcome,
    Rewrite,
    SessionEnd,
    decode,
    encode,
)
from qrloop.runs import open_store
from qrloop.serving import AnnouncementFollower, Rewriter, load_version
from qrloop.settings import REPO_ROOT, RewriterSettings, Settings
from qrloop.topics import ensure_topics
from tests.faults import fuzz
from tests.faults.conftest import private_topics
from tests.helpers import aggregator_env, pair, unique_topic_name

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

N = 10_000
ALL = list(fuzz.CATEGORIES)
NO_PAST = [c for c in ALL if c != "past_time"]
NO_TIME = [c for c in ALL if c not in ("past_time", "future_time")]


def query_template(ids: list[str]) -> fuzz.Template:
    def make(rng: random.Random) -> QueryEvent:
        picks = [rng.sample(ids, 4) for _ in range(3)]
        return QueryEvent(
            event_id=fuzz.fresh_id(rng),
            event_time=datetime.now(UTC),
            shopper_id="s",
            session_id="x",
            query="angle bracket",
            policy_version=1,
            original_products=picks[0],
            rewrites=[
                Rewrite(rewrite_id="r1", text="metal bracket", logprob=-3.0, products=picks[1]),
                Rewrite(rewrite_id="r2", text="bracket", logprob=-2.0, products=picks[2]),
            ],
        )

    return make


def unknown_products(rng: random.Random, event: object) -> bytes:
    assert isinstance(event, QueryEvent)
    rewrites = [r.model_copy(update={"products": [f"nope-{rng.randrange(10**9)}"]}) for r in event.rewrites]
    return encode(event.model_copy(update={"rewrites": rewrites}))


def feedback_template(ids: list[str]) -> fuzz.Template:
    def make(rng: random.Random) -> Interaction | SessionEnd:
        if rng.random() < 0.3:
            return SessionEnd(
                query_event_id=fuzz.fresh_id(rng),
                shopper_id="s",
                interactions_sent=2,
                event_time=datetime.now(UTC),
            )
        return Interaction(
            event_id=fuzz.fresh_id(rng),
            query_event_id=fuzz.fresh_id(rng),
            rewrite_id="r1",
            product_id=rng.choice(ids),
            position=rng.randrange(10),
            kind=rng.choice(["impression", "click", "add_to_cart", "purchase"]),
            event_time=datetime.now(UTC),
        )

    return make


def orphan_of_unknown_product(rng: random.Random, event: object) -> bytes:
    """Feedback on a product nobody showed, for a query that never comes: an orphan once it expires."""
    return encode(
        Interaction(
            event_id=fuzz.fresh_id(rng),
            query_event_id=fuzz.fresh_id(rng),
            rewrite_id="r1",
            product_id=f"nope-{rng.randrange(10**9)}",
            position=0,
            kind="click",
            event_time=datetime.now(UTC),
        )
    )


def pair_template(rng: random.Random) -> PreferencePair:
    return pair(rng.randrange(10**9))


def outcome_template(rng: random.Random) -> QueryOutcome:
    reward = rng.random()
    return QueryOutcome(
        query_event_id=fuzz.fresh_id(rng),
        event_time=datetime.now(UTC),
        policy_version=1,
        arm="production",
        reward=reward,
        relevance=0.5,
        rewards=[reward, reward],
        logprobs=[-1.0, -2.0],
        tie=False,
    )


def announcement_template(rng: random.Random) -> PolicyAnnouncement:
    return PolicyAnnouncement(kind="alias_moved", version=1, alias="production", previous_version=None)


def unknown_version(rng: random.Random, event: object) -> bytes:
    return encode(
        PolicyAnnouncement(kind="alias_moved", version=10**6 + rng.randrange(10**6), alias="production")
    )


def ignored_total() -> float:
    return sum(
        s.value
        for f in REGISTRY.collect()
        if f.name == "qrloop_announcements_ignored"
        for s in f.samples
        if s.name.endswith("_total")
    )


def ignored_by_reason() -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for f in REGISTRY.collect()
        if f.name == "qrloop_announcements_ignored"
        for s in f.samples
        if s.name.endswith("_total")
    }


@pytest.fixture
def fuzz_settings(base_settings: Settings, kafka_bootstrap: str, tmp_path: Path, tiny_dir: Path) -> Settings:
    prefix = unique_topic_name()
    settings = private_topics(base_settings, prefix).model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'qrloop.db'}", "blob_dir": tmp_path / "blobs"}
    )
    settings = settings.model_copy(
        update={
            "topics": settings.topics.model_copy(update={"partitions": 2}),
            "dpo": settings.dpo.model_copy(update={"learner_name": prefix, "learning_rate": 1e-4}),
            "streams": settings.streams.model_copy(
                update={
                    "app_id": f"{prefix}-agg",
                    "attribution_window_s": 2.0,
                    "grace_s": 1.0,
                    "idle_advance_s": 1.0,
                    "tick_s": 0.5,
                    "orphan_after_s": 3.0,
                }
            ),
        }
    )
    ensure_topics(settings)
    ensure_topics(settings, {f"{prefix}.agg-pairs": 1, f"{prefix}.agg-outcomes": 1})
    db.upgrade(settings.db_url)
    store = open_store(settings)
    start = store.publish(tiny_dir, base_model="tiny-llama", actor="test")
    store.set_alias("production", start.id, reason="start", actor="test")
    store.close()
    return settings


def test_fuzz_every_input_topic(fuzz_settings: Settings, tmp_path: Path, tiny_dir: Path) -> None:
    settings = fuzz_settings
    t = settings.topics
    started = time.monotonic()
    ids = Catalog.open(settings).dataset.products["product_id"].head(200).tolist()
    plan = {
        t.query_events: fuzz.messages(query_template(ids), N, 1, ALL, unknown_products),
        t.interactions: fuzz.messages(feedback_template(ids), N, 2, ALL, orphan_of_unknown_product),
        t.preference_pairs: fuzz.messages(pair_template, N, 3, NO_PAST),
        t.query_outcomes: fuzz.messages(outcome_template, N, 4, ALL),
        t.policy_versions: fuzz.messages(announcement_template, N, 5, NO_TIME, unknown_version),
    }

    # The aggregator first: its start and the relevance model's load overlap the generation. Its pairs and
    # outcomes go to topics of their own: the learner and the canary job see only the fuzz and their events.
    log = tmp_path / "aggregator.log"
    prefix = settings.dpo.learner_name  # the fixture created its aggregator topics under this name
    aggregator_settings = settings.model_copy(
        update={
            "topics": t.model_copy(
                update={"preference_pairs": f"{prefix}.agg-pairs", "query_outcomes": f"{prefix}.agg-outcomes"}
            )
        }
    )
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=aggregator_env(aggregator_settings, tmp_path)
        | {"QRLOOP_TOPICS__QUERY_OUTCOMES": aggregator_settings.topics.query_outcomes},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # The consumers that follow from "now" start first: the follower (end of topic) and the canary job.
        store = open_store(settings)
        rewriter = Rewriter(
            load_version(store.load_dir(1), 1), lambda q: ids[:4], RewriterSettings(max_new_tokens=4)
        )
        follower = AnnouncementFollower(settings, rewriter, "production", store).start()
        producer = KafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            acks="all",
            linger_ms=50,
            batch_size=256 * 1024,
        )
        canary = CanaryJob(settings, store, producer)
        time.sleep(1.0)
        ignored_before, by_reason_before = ignored_total(), ignored_by_reason()

        sent: dict[str, Counter[str]] = {}
        for topic, stream in plan.items():
            sent[topic] = Counter()
            for category, raw in stream:
                producer.send(topic, key=uuid.uuid4().bytes, value=raw)
                sent[topic][category] += 1
        producer.flush()
        generated = time.monotonic() - started

        # Valid events after the fuzz, one per consumer.
        v2 = store.publish(tiny_dir, base_model="tiny-llama", parent=1, tags={"fuzz": "after"})
        store.set_alias("production", v2.id)
        producer.send(
            t.policy_versions,
            value=encode(PolicyAnnouncement(kind="alias_moved", version=v2.id, alias="production")),
        )
        valid_query = query_template(ids)(random.Random(9))
        assert isinstance(valid_query, QueryEvent)
        producer.send(t.query_events, key=valid_query.event_id.encode(), value=encode(valid_query))
        end = SessionEnd(
            query_event_id=valid_query.event_id,
            shopper_id="s",
            interactions_sent=0,
            event_time=valid_query.event_time,
        )
        producer.send(t.interactions, key=valid_query.event_id.encode(), value=encode(end))
        valid_pairs = [pair(n) for n in range(16)]
        for p in valid_pairs:
            producer.send(t.preference_pairs, key=p.pair_id.encode(), value=encode(p))
        producer.send(t.query_outcomes, value=encode(outcome_template(random.Random(10))))
        producer.flush()

    except BaseException:
        aggregator.kill()
        raise
    try:
        # The learner and the canary job in this process, meanwhile.
        learner = build(settings)
        published = None
        deadline = time.monotonic() + 300
        while published is None and time.monotonic() < deadline:
            published = learner.run_once(timeout_ms=300)
        learner.producer.flush()
        learner.consumer.close()
        read = canary.poll(timeout_s=120)
        producer.flush()
        # The aggregator's pair for the valid query, and every dead letter.
        letters: list[DeadLetter] = []
        agg_outcomes: list[QueryOutcome] = []
        consumer = KafkaConsumer(
            t.dead_letter,
            aggregator_settings.topics.query_outcomes,
            bootstrap_servers=settings.kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=1000,
        )
        deadline = time.monotonic() + 300
        expected = 4 * N  # every topic but the follower's
        while time.monotonic() < deadline and (len(letters) < expected or not agg_outcomes):
            assert aggregator.poll() is None, log.read_text()[-4000:]
            for m in consumer:
                if m.topic == t.dead_letter:
                    letters.append(decode(DeadLetter, m.value))
                else:
                    agg_outcomes.append(decode(QueryOutcome, m.value))
        time.sleep(2)
        letters += [decode(DeadLetter, m.value) for m in consumer if m.topic == t.dead_letter]
        consumer.close()
        aggregator_alive = aggregator.poll() is None
        deadline = time.monotonic() + 60
        while v2.id not in [v for v, _ in follower.swaps] and time.monotonic() < deadline:
            time.sleep(0.2)
        follower_alive = follower._thread.is_alive()
    finally:
        follower.stop()
        canary.close()
        producer.close()
        aggregator.terminate()
        aggregator.wait(timeout=60)
        store.close()
    log_text = log.read_text()

    per_topic = Counter(letter.source_topic for letter in letters)
    reasons: dict[str, Counter[str]] = {}
    for letter in letters:
        reasons.setdefault(letter.source_topic, Counter())[letter.reason] += 1
    ignored = ignored_total() - ignored_before
    follower_reasons = {k: v - by_reason_before.get(k, 0) for k, v in ignored_by_reason().items()}
    total = sum(sum(c.values()) for c in sent.values())
    print(f"\nfuzz: {total} messages generated and sent in {generated:.0f} s, ", end="")
    print(f"whole test {time.monotonic() - started:.0f} s")
    for topic in plan:
        print(f"  {topic}: sent {dict(sent[topic])}")
        print(f"  {topic}: dead letters {dict(reasons.get(topic, {}))}")
    print(f"  {t.policy_versions}: follower ignored {ignored:.0f} {follower_reasons}")
    print(f"  canary read {read}; learner published version {published}; ", end="")
    print(f"aggregator outcomes {len(agg_outcomes)}")

    for topic in (t.query_events, t.interactions, t.preference_pairs, t.query_outcomes):
        assert per_topic[topic] == N, (topic, per_topic[topic], dict(reasons.get(topic, {})))
    # An announcement of an unknown version is harmless now: it only makes the follower read the alias from
    # the store (the authority); every unreadable one is counted.
    assert ignored == N - sent[t.policy_versions]["unknown"], follower_reasons
    assert aggregator_alive and "Crashed" not in log_text, log_text[-4000:]
    assert follower_alive and v2.id in [v for v, _ in follower.swaps], (
        "the follower still swaps after the fuzz"
    )
    assert [o.query_event_id for o in agg_outcomes] == [valid_query.event_id], "the valid query was scored"
    assert published is not None, "the learner trained the 16 valid pairs after the fuzz"
    assert read == N + 1 and len(canary.outcomes) == 1, (
        "the canary job read everything and kept the valid one"
    )
