"""Faults at the other consumers and producers, on the real broker and both databases: the canary job's
outcome window (poison and far-off event times), the rewriter's announcement follower (poison and
announcements that cannot be applied), and sends the broker refuses (rewriter and replay)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from prometheus_client import REGISTRY

from policy_store import db
from qrloop.canary_job import CanaryJob
from qrloop.events import PolicyAnnouncement, QueryOutcome, encode
from qrloop.runs import open_store
from qrloop.serving import (
    AnnouncementFollower,
    EventNotWrittenError,
    Rewriter,
    RewriteRequest,
    RewriterService,
    load_version,
)
from qrloop.settings import RewriterSettings, Settings
from qrloop.topics import ensure_topics
from streams.replay import DeliveryError, publish
from tests.faults.conftest import dead_letters, private_topics, send_all
from tests.helpers import bracket_query


def fake_search(text: str) -> list[str]:
    return [f"p{abs(hash(w)) % 50}" for w in text.split()][:10]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ignored_total() -> float:
    return sum(
        s.value
        for f in REGISTRY.collect()
        if f.name == "qrloop_announcements_ignored"
        for s in f.samples
        if s.name.endswith("_total")
    )


def outcome(at: datetime, reward: float = 0.5) -> QueryOutcome:
    return QueryOutcome(
        query_event_id=str(uuid.uuid4()),
        event_time=at,
        policy_version=1,
        arm="production",
        reward=reward,
        relevance=0.5,
        rewards=[reward, reward],
        logprobs=[-1.0, -1.0],
        tie=False,
    )


def test_canary_window_refuses_poison_and_far_off_times(
    settings: Settings, kafka_bootstrap: str, unique_topic: str
) -> None:
    configured = private_topics(settings, unique_topic)
    ensure_topics(configured)
    db.upgrade(configured.db_url)
    store = open_store(configured)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    job = CanaryJob(configured, store, producer)
    now = datetime.now(UTC)
    valid = encode(outcome(now)).decode()
    poison = {
        "future": encode(outcome(now + timedelta(days=365))),
        "past": encode(outcome(now - timedelta(days=60))),
        "huge_number": valid.replace('"reward":0.5', '"reward":' + "1" * 5000, 1).encode(),
        "deep_nesting": valid.replace(
            '"rewards":[', '"rewards":[' + "[" * 5000 + "]" * 5000 + ",", 1
        ).encode(),
        "year_9999_offset": valid.replace(
            valid.split('"event_time":"')[1].split('"')[0], "9999-12-31T23:00:00-05:00"
        ).encode(),
    }
    send_all(configured, configured.topics.query_outcomes, ((b"bad", raw) for raw in poison.values()))
    send_all(configured, configured.topics.query_outcomes, ((None, encode(outcome(now))) for _ in range(3)))
    read = job.poll()
    producer.flush()
    assert read == 8
    assert len(job.outcomes) == 3, "the valid outcomes after the poison are all in the evidence"
    newest = max(o.event_time for o in job.outcomes).timestamp()
    assert newest <= time.time() + 1, "no outcome from the future entered the evidence"
    reasons = {letter.original_bytes(): letter.reason for letter in dead_letters(configured)}
    landed = {name: reasons.get(raw) for name, raw in poison.items()}
    assert landed == {
        "future": "event_time_out_of_range",
        "past": "event_time_out_of_range",
        "huge_number": "malformed_json",
        "deep_nesting": "malformed_json",
        "year_9999_offset": "invalid_schema",
    }, landed
    job.close()
    producer.close()
    store.close()


def test_follower_survives_poison_and_unappliable_announcements(
    settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dir: Path
) -> None:
    configured = private_topics(settings, unique_topic)
    ensure_topics(configured, {configured.topics.policy_versions: 1})
    db.upgrade(configured.db_url)
    store = open_store(configured)
    v1 = store.publish(tiny_dir, base_model="tiny")
    rewriter = Rewriter(
        load_version(store.load_dir(v1), v1.id), fake_search, RewriterSettings(max_new_tokens=4)
    )
    follower = AnnouncementFollower(configured, rewriter, "production", store).start()
    time.sleep(1.0)  # the follower starts at the end of the topic
    moved = PolicyAnnouncement(kind="alias_moved", version=v1.id, alias="production")
    valid = encode(moved).decode()
    ignored_before = ignored_total()
    poison = [
        valid.replace(f'"version":{v1.id}', '"version":' + "9" * 5000).encode(),
        valid.replace('"details":{}', '"details":{"x":' + "[" * 5000 + "]" * 5000 + "}").encode(),
        b"\xff\xfe",
        encode(
            PolicyAnnouncement(kind="alias_moved", version=999_999, alias="production")
        ),  # no such version
    ]
    send_all(configured, configured.topics.policy_versions, ((None, raw) for raw in poison))
    v2 = store.publish(tiny_dir, base_model="tiny", parent=v1.id, tags={"n": 2})
    store.set_alias("production", v2.id)
    send_all(
        configured,
        configured.topics.policy_versions,
        [(None, encode(PolicyAnnouncement(kind="alias_moved", version=v2.id, alias="production")))],
    )
    deadline = time.monotonic() + 60
    while rewriter.version != v2.id and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = follower._thread.is_alive()
    follower.stop()
    ignored = ignored_total()
    assert alive and rewriter.version == v2.id, "the follower still swaps after the poison"
    # The unknown version is no poison any more: an announcement only makes the follower read the alias from
    # the store (the authority), which never names a version it does not hold.
    assert ignored - ignored_before == 3, "each unreadable announcement counted"
    store.close()


@pytest.fixture
def tiny_topic(kafka_bootstrap: str, unique_topic: str) -> str:
    """A topic whose broker-side record limit refuses every query event: a real send failure."""
    name = f"{unique_topic}.small"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "200"})])
    admin.close()
    ensure_topics(kafka_bootstrap, {name: 1})
    return name


def test_a_query_whose_event_is_not_written_gets_an_error_and_a_metric(
    settings: Settings, kafka_bootstrap: str, tiny_topic: str, tiny_dir: Path
) -> None:
    configured = settings.model_copy(
        update={"topics": settings.topics.model_copy(update={"query_events": tiny_topic})}
    )
    rewriter = Rewriter(load_version(tiny_dir, 1), fake_search, RewriterSettings(max_new_tokens=4))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", retries=0)
    service = RewriterService(configured, rewriter, producer)
    before = metric("qrloop_events_not_written_total", role="rewriter", topic=tiny_topic)
    with pytest.raises(EventNotWrittenError, match=tiny_topic):
        service.handle(RewriteRequest(query="angle bracket"))
    server = service.http_server(0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server_address[1]}/rewrite",
        data=json.dumps({"query": "cordless drill"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 503 and "could not be written" in json.loads(answer.value.read())["error"]
    finally:
        server.shutdown()
        server.server_close()
        producer.close()
    assert metric("qrloop_events_not_written_total", role="rewriter", topic=tiny_topic) - before == 2


def test_replay_reports_records_the_broker_refused(
    base_settings: Settings, kafka_bootstrap: str, tiny_topic: str
) -> None:
    configured = base_settings.model_copy(
        update={"topics": base_settings.topics.model_copy(update={"query_events": tiny_topic})}
    )
    events = [bracket_query([f"p{i}" for i in range(8)], datetime.now(UTC)) for _ in range(3)]
    with pytest.raises(DeliveryError, match="3 of 3 records were not written"):
        publish(configured, events)
