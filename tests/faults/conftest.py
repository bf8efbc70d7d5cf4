"""Fixtures of the fault suite: a learner's private topics, database and tiny policy; helpers to read back
what landed where (dead letters, training records, announcements)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from learner.ledger import steps_of, training_counts
from policy_store import db
from qrloop.events import DeadLetter, PreferencePair, decode, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import isolate, open_store
from qrloop.settings import Settings
from qrloop.topics import ensure_topics
from tests import helpers


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()))


def private_topics(settings: Settings, prefix: str) -> Settings:
    """An isolated run (``qrloop.runs.isolate``) on one pair partition: these tests delete records and count
    offsets on partition 0 (offsets per partition across several are ``tests/test_learner.py``'s)."""
    isolated = isolate(settings, prefix, None)
    topics = isolated.topics.model_copy(update={"pair_partitions": 1})
    return isolated.model_copy(update={"topics": topics})


@pytest.fixture
def learner_settings(settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dir: Path) -> Settings:
    """Private topics, database (SQLite and PostgreSQL) and blobs; the tiny policy as production."""
    configured = private_topics(settings, unique_topic)
    dpo = configured.dpo.model_copy(update={"learner_name": unique_topic, "learning_rate": 1e-4})
    configured = configured.model_copy(update={"dpo": dpo})
    ensure_topics(configured)
    db.upgrade(configured.db_url)
    store = open_store(configured)
    start = store.publish(tiny_dir, base_model="tiny-llama", actor="test")
    store.set_alias("production", start.id, reason="start", actor="test")
    store.close()
    return configured


def send_all(settings: Settings, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=5)
    n = 0
    for key, value in messages:
        producer.send(topic, key=key, value=value)
        n += 1
    producer.flush()
    producer.close()
    return n


def send_pairs(settings: Settings, pairs: Iterable[PreferencePair]) -> int:
    return send_all(
        settings, settings.topics.preference_pairs, ((p.pair_id.encode(), encode(p)) for p in pairs)
    )


def read_topic(settings: Settings, topic: str, timeout_ms: int = 1500) -> list[bytes]:
    """Every record of ``topic`` (all partitions) from the beginning."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=timeout_ms,
    )
    values = [m.value for m in consumer]
    consumer.close()
    return values


def dead_letters(settings: Settings, timeout_ms: int = 1500) -> list[DeadLetter]:
    return [decode(DeadLetter, v) for v in read_topic(settings, settings.topics.dead_letter, timeout_ms)]


def trained(settings: Settings) -> dict[str, int]:
    """Pair id → how many steps trained it, from the training records (no key forbids a duplicate)."""
    store = open_store(settings)
    try:
        with store.read_session() as session:
            return training_counts(session, settings.dpo.learner_name)
    finally:
        store.close()


def steps(settings: Settings) -> dict[int, list[str]]:
    store = open_store(settings)
    try:
        with store.read_session() as session:
            return steps_of(session, settings.dpo.learner_name)
    finally:
        store.close()


def learner_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``qrloop learn`` subprocess on these settings (a short lease: a killed learner's
    successor must not wait long to train)."""
    return helpers.learner_env(settings) | {
        "QRLOOP_DPO__PUBLISH_EVERY": str(settings.dpo.publish_every),
        **extra,
    }
