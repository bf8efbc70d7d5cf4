"""The aggregator's transport keeps records that Faust drops during a rebalance uncommitted (no broker needed;
the rebalance itself is exercised in test_scale_aggregators)."""

from __future__ import annotations

import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from qrloop.settings import Settings
from streams.app import AggregatorApp, create_app
from streams.kafka_transport import RebalanceSafeConsumer


@pytest.fixture
def built(base_settings: Settings) -> AggregatorApp:
    built = create_app(base_settings)
    # The conductor marks an agent's topic as acking when it subscribes at start; this app never starts.
    built.app.topics.acking_topics.add(base_settings.topics.query_events)
    built.app.flow_control.resume()
    built.app.consumer_generation_id = 3
    return built


def message(tp: TP, offset: int, generation: int, tracked: bool) -> ConsumerMessage:
    record = ConsumerMessage(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0.0,
        timestamp_type=0,
        headers=[],
        key=b"k",
        value=b"v",
        checksum=None,
        tp=tp,
        generation_id=generation,
    )
    record.tracked = tracked  # the stream tracks a record just before its agent sees it
    return record


def test_the_aggregator_runs_on_the_rebalance_safe_consumer(built: AggregatorApp) -> None:
    assert isinstance(built.app.consumer, RebalanceSafeConsumer)


def test_records_skipped_during_a_rebalance_stay_uncommitted(built: AggregatorApp) -> None:
    consumer = built.app.consumer
    tp = TP(built.settings.topics.query_events, 0)
    assert message(tp, 5, generation=2, tracked=False).ack(consumer) is False  # fetched by the old generation
    built.app.flow_control.suspend()
    assert message(tp, 6, generation=3, tracked=False).ack(consumer) is False  # taken out while flow stopped
    assert list(consumer._acked[tp]) == []
    built.app.flow_control.resume()
    # Read again after the seek, processed (tracked), acked: only now is the offset committable.
    assert message(tp, 5, generation=3, tracked=True).ack(consumer) is True
    assert list(consumer._acked[tp]) == [5]


def test_untracked_records_outside_a_rebalance_are_acked_as_faust_does(built: AggregatorApp) -> None:
    """A record that fails to decode is acked untracked: held back, its partition would never commit."""
    consumer = built.app.consumer
    tp = TP(built.settings.topics.query_events, 1)
    assert message(tp, 9, generation=3, tracked=False).ack(consumer) is True
    assert list(consumer._acked[tp]) == [9]
