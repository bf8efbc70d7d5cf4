"""The aggregator's Faust application: app, topics and table declared in one place (Faust's examples' style).

``create_app(settings)`` builds everything from the settings object, so a test or a second deployment can run
its own instance. This module only declares: the agents that run on it are installed by
``streams.aggregator`` (which imports this module, never the reverse; ``qrloop aggregate`` and
``python -m streams.aggregator worker`` start it). The window table is changelog-backed: its state survives a
restart by replaying the changelog topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faust

from qrloop.settings import Settings
from streams.kafka_transport import RebalanceSafeTransport
from streams.progress import InputProgress


@dataclass
class AggregatorApp:
    app: faust.App
    settings: Settings
    query_events: Any
    interactions: Any
    pairs: Any
    dead_letter: Any
    closes: Any
    windows: Any
    outcomes: Any = None  # per-query outcomes for the canary (QueryOutcome)
    # What the agents handled, against the inputs' end offsets: the wedge check (streams.progress).
    progress: InputProgress[Any] = field(default_factory=InputProgress)


def create_app(settings: Settings) -> AggregatorApp:
    datadir = settings.cache_dir / "faust" / settings.streams.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level itself
    app = faust.App(
        settings.streams.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
        # Bytes in, bytes out: qrloop.events validates every message itself, so a malformed one can go to
        # the dead-letter topic with its original bytes instead of crashing the agent in a codec.
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        store="memory://",  # in-memory state, made durable by the table's changelog topic
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        topic_allow_declare=True,  # the broker refuses auto-creation; Faust declares what it owns
        consumer_auto_offset_reset="earliest",
        # At-least-once: faust-streaming's exactly_once has open bugs. Pairs carry a deterministic id, so a
        # pair re-emitted after a crash is recognised downstream; exactly-once training is the learner's job.
        processing_guarantee="at_least_once",
        datadir=str(datadir),
        # Several `qrloop aggregate` workers form one consumer group named by the app id; Kafka hands each
        # some partitions of the co-partitioned inputs and the same partitions of the table's changelog.
        broker_session_timeout=settings.streams.session_timeout_s,
        broker_heartbeat_interval=settings.streams.session_timeout_s / 5,  # Kafka wants it below 1/3
        table_standby_replicas=settings.streams.standby_replicas,
        producer_linger=settings.streams.producer_linger_s,
    )
    # Before any topic is declared (declaring one builds the default transport): see streams.kafka_transport.
    app.transport = RebalanceSafeTransport(app.conf.broker_consumer, app)
    topics = settings.topics
    query_events = app.topic(topics.query_events, partitions=topics.partitions)
    interactions = app.topic(topics.interactions, partitions=topics.partitions)
    pairs = app.topic(topics.preference_pairs, partitions=topics.pair_partitions)
    dead_letter = app.topic(topics.dead_letter, partitions=1)
    # Close requests from the timer come back through a topic co-partitioned with the inputs, because a
    # Faust table may only be changed inside stream iteration on the key's own partition.
    closes = app.topic(f"{settings.streams.app_id}-closes", partitions=topics.partitions, internal=True)
    windows = app.Table("windows", default=None, partitions=topics.partitions)
    outcomes = app.topic(topics.query_outcomes, partitions=1)
    return AggregatorApp(
        app, settings, query_events, interactions, pairs, dead_letter, closes, windows, outcomes=outcomes
    )
