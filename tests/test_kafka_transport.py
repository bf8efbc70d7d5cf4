"""The aggregator's transport keeps records that Faust drops during a rebalance uncommitted, and reports
committed offsets that fell out of their partition (no broker needed; the real rebalances and deletions are
exercised in test_scale_aggregators)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from prometheus_client import REGISTRY

from qrloop.settings import Settings
from streams.app import AggregatorApp, create_app
from streams.kafka_transport import DrainingProducerBuffer, RebalanceSafeConsumer, read_on_past_lost_ranges


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


def consumer_of(built: AggregatorApp) -> RebalanceSafeConsumer:
    consumer = built.app.consumer
    # The app's ConsumerT, narrowed to reach Faust's internals.
    assert isinstance(consumer, RebalanceSafeConsumer)
    return consumer


def test_the_aggregator_runs_on_the_rebalance_safe_consumer(built: AggregatorApp) -> None:
    assert isinstance(built.app.consumer, RebalanceSafeConsumer)


def test_records_skipped_during_a_rebalance_stay_uncommitted(built: AggregatorApp) -> None:
    consumer = consumer_of(built)
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
    consumer = consumer_of(built)
    tp = TP(built.settings.topics.query_events, 1)
    assert message(tp, 9, generation=3, tracked=False).ack(consumer) is True
    assert list(consumer._acked[tp]) == [9]


class FakeAiokafka:
    """The three calls read_on_past_lost_ranges makes of aiokafka's consumer, over fixed log bounds."""

    def __init__(self, starts: dict[TP, int], ends: dict[TP, int]) -> None:
        self.starts, self.ends = starts, ends
        self.seeks: list[tuple[TP, int]] = []

    async def beginning_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self.starts[tp] for tp in tps}

    async def end_offsets(self, tps: list[TP]) -> dict[TP, int]:
        return {tp: self.ends[tp] for tp in tps}

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def lost(tp: TP) -> float:
    labels = {"role": "aggregator", "topic": tp.topic, "partition": str(tp.partition)}
    return REGISTRY.get_sample_value("qrloop_records_lost_total", labels) or 0.0


def test_committed_offsets_outside_their_partition_are_reported_and_moved(unique_topic: str) -> None:
    deleted, fine, recreated = (TP(unique_topic, p) for p in range(3))
    fake = FakeAiokafka(starts={deleted: 4, fine: 0, recreated: 0}, ends={deleted: 5, fine: 9, recreated: 3})
    before = {tp: lost(tp) for tp in (deleted, fine, recreated)}
    moved = asyncio.run(read_on_past_lost_ranges(fake, {deleted: 2, fine: 7, recreated: 6}))
    assert moved == {deleted: 4, recreated: 0}
    assert fake.seeks == [(deleted, 4), (recreated, 0)]
    # Offsets 2 and 3 were deleted unread; past the end nothing is known lost.
    assert {tp: lost(tp) - before[tp] for tp in before} == {deleted: 2.0, fine: 0.0, recreated: 0.0}


def test_faust_commits_after_a_loss_only_from_the_moved_offset(built: AggregatorApp) -> None:
    """Why the moved offsets are handed back to Faust as committed: from the stale one, the first record read
    after the loss looks like one after a gap, and Faust's commit stops there."""
    consumer = consumer_of(built)
    stale, moved = TP(built.settings.topics.query_events, 2), TP(built.settings.topics.query_events, 3)
    consumer._committed_offset[stale] = 2
    consumer._committed_offset[moved] = 4
    for tp in (stale, moved):
        assert message(tp, 4, generation=3, tracked=True).ack(consumer) is True
    assert consumer._new_offset(stale) is None
    assert consumer._new_offset(moved) == 5


class SlowChannel:
    """A topic whose every publish takes ``seconds`` (a stalled machine, or the event loop busy elsewhere)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.published: list[int] = []

    async def publish_message(self, fut: Any, wait: bool = False) -> None:
        await asyncio.sleep(self.seconds)
        self.published.append(fut.number)


def buffered_write(channel: SlowChannel, number: int) -> Any:
    """What the table's changelog puts in the buffer, as far as the buffer reads it."""
    return SimpleNamespace(number=number, message=SimpleNamespace(channel=channel))


async def flush_three_slow_writes(buffer: ProducerBuffer, app: Any) -> list[int]:
    """Put three writes of 0.3 s each, flush, and return the writes handed on when the flush returned."""
    buffer.app = app
    channel = SlowChannel(0.3)
    await buffer.start()
    try:
        for number in range(3):
            buffer.put(buffered_write(channel, number))
        await buffer.flush()
        handed_on = list(channel.published)
        while len(channel.published) < 3:  # the rest first: a stop refuses to flush a non-empty buffer
            await asyncio.sleep(0.1)
        return handed_on
    finally:
        await buffer.stop()


def test_the_flush_before_a_commit_waits_for_every_changelog_write(
    built: AggregatorApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Faust's flush returns after 0.1 s without a write handed on, and the commit that follows it moves past
    records whose window changes are not in the changelog yet (a worker killed then loses those windows).
    Ours returns when all are handed on."""
    assert isinstance(built.app.producer.buffer, DrainingProducerBuffer)

    async def both() -> tuple[list[int], list[int]]:
        stock = await flush_three_slow_writes(ProducerBuffer(), built.app)
        draining = await flush_three_slow_writes(DrainingProducerBuffer(), built.app)
        return stock, draining

    caplog.set_level(logging.INFO, logger="streams.kafka_transport")
    stock, draining = asyncio.run(both())
    assert stock == [], "Faust's own flush gave up before the first slow write was handed on"
    assert draining == [0, 1, 2]
    # Said once, by ours: the wait that Faust's flush would have cut short.
    flushes = [r.getMessage().split(" took")[0] for r in caplog.records if "buffered" in r.getMessage()]
    assert flushes == ["flush of 3 buffered writes"]
