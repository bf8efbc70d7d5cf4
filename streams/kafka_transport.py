"""Faust's aiokafka transport, with four fixes so that the aggregator neither commits an input record unread
nor skips one, and commits none whose window change is not yet in the table's changelog:

- a record dropped during a rebalance stays uncommitted, and a partition with nothing committed is rewound;
- the seek to the committed offsets after a rebalance runs with the inputs paused (``perform_seek``);
- a committed offset that retention deleted is reported, not silently reset;
- the flush before a commit waits for every buffered changelog write (``DrainingProducerBuffer``).

Faust drops a record that its stream takes out of the buffer while a rebalance is under way (fetched under
a superseded group generation, or while flow is stopped: faust-streaming#223) and acks it, so the next
commit moves past it. The seek to the committed offsets after the rebalance is meant to re-read such
records, but (1) an acked record is already inside the committed range, and (2) aiokafka only seeks where
something above 0 was committed, so a fresh partition keeps its fetch position past the dropped record. The
records were lost for good: 81 of 251 sessions when two workers started together (on partitions the first
worker had fetched ahead before the second joined), 1 of 24 in a CI run.

Here a dropped record is not acked (its offset stays uncommitted), and an input partition with nothing
committed is rewound to its beginning, as ``auto_offset_reset="earliest"`` means. Records that were processed
before the rebalance but not yet committed are processed again: at-least-once, as before, and the pair ids
are deterministic so the learner drops the repeats.

Faust's at-least-once commit flushes the producer first, so that the table's changelog holds every window
change made by the records it commits. But the table's writes wait in Faust's producer buffer, and its flush
gives up after 0.1 s without a message handed on (``ProducerBuffer.flush_atmost``), then commits anyway:
after a stall that long (a busy machine, M1 loading on the event loop) the offsets of records whose window
changes were never written are committed. A worker killed then loses those windows: its successor restores
them from the changelog without the change and never reads the records again. Here the flush waits until
every buffered write has been handed to aiokafka, whose own flush then waits for the broker's acks.

A committed offset that is no longer in its partition (retention deleted records before they were read) is
reported with the lost range and counted, as the learner does, instead of aiokafka's silent reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP, Message

from qrloop.topics import report_out_of_range

log = logging.getLogger(__name__)

STALL_S = 0.1  # Faust's flush gives up after this long without a write handed on


class RebalanceSafeConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed_or_beginning)

    async def _seek_to_committed_or_beginning(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        committed: Mapping[TP, int] = await consumer.seek_to_committed()
        # Only the agents' inputs: Faust's recovery positions a table's changelog (and commits nothing there).
        streamed = self.app.topics.acking_topics
        # aiokafka seeks only where the committed offset is above 0: rewind the others explicitly.
        uncommitted = [tp for tp, offset in committed.items() if not offset and tp.topic in streamed]
        if uncommitted:
            names = ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in uncommitted))
            log.info("nothing committed yet on %s: read from the beginning", names)
            await consumer.seek_to_beginning(*uncommitted)
        resumed = {tp: offset for tp, offset in committed.items() if offset and tp.topic in streamed}
        moved = await read_on_past_lost_ranges(consumer, resumed) if resumed else {}
        # Faust takes the returned offsets as committed. Left stale (below the log start), the first record
        # read there looks like one after a gap; unless Faust happened to note that gap (it does only when the
        # record arrives after it has set its read position, a race), it never commits the partition again.
        return {**committed, **moved}


async def read_on_past_lost_ranges(consumer: Any, committed: Mapping[TP, int]) -> dict[TP, int]:
    """A committed offset outside its partition would make aiokafka reset to the earliest record without a
    word: report the lost range, as every role does (``qrloop.topics.report_out_of_range``), and read on
    from the earliest record still there. ``consumer`` is aiokafka's; returns the partitions moved, with
    their new offsets."""
    starts = await consumer.beginning_offsets(list(committed))
    ends = await consumer.end_offsets(list(committed))
    moved = {}
    for tp, offset in committed.items():
        if not starts[tp] <= offset <= ends[tp]:
            report_out_of_range("aggregator", tp.topic, tp.partition, offset, starts[tp], ends[tp])
            consumer.seek(tp, starts[tp])
            moved[tp] = starts[tp]
    return moved


class RebalanceSafeConsumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Partitions already logged for the latest generation seen: one line each, not one per record, and
        # the set never outgrows the assignment.
        self._reported: tuple[int | None, set[TP]] = (None, set())

    async def perform_seek(self) -> None:
        """Seek the agents' input partitions to their committed offsets with their delivery paused.

        After a rebalance Faust resumes those partitions (with the flow already on since its table recovery)
        and only then seeks them: records fetched from the old position are delivered while the seek moves
        the position, and Faust's read offsets, under them. One record of a partition could be skipped
        unread and another delivered twice (seen after a takeover: a session's end read twice, the click
        before it never, so its window never completed). Paused, nothing more of those partitions is
        delivered until the seek is done; whatever was already on its way is read again after it, as
        at-least-once allows.
        """
        streamed = {tp for tp in self.assignment() if tp.topic in self.app.topics.acking_topics}
        already_paused = set(self._paused_partitions)
        self.pause_partitions(streamed)
        try:
            await super().perform_seek()
        finally:
            self.resume_partitions(streamed - already_paused)

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return RebalanceSafeConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: Message) -> bool:
        if dropped_by_rebalance(message, self.app):
            self._report_dropped(message)
            return False  # left uncommitted: the seek after the rebalance reads it again
        return bool(super().ack(message))

    def _report_dropped(self, message: Message) -> None:
        generation, partitions = self._reported
        if generation != message.generation_id:
            generation, partitions = self._reported = (message.generation_id, set())
        if message.tp not in partitions:
            partitions.add(message.tp)
            log.info(
                "record %s[%d]@%d fetched during a rebalance (generation %s): left uncommitted, read again",
                message.tp.topic,
                message.tp.partition,
                message.offset,
                message.generation_id,
            )


def dropped_by_rebalance(message: Message, app: Any) -> bool:
    """True for a record the stream skipped unprocessed, by the very test Faust's stream uses to skip it.

    A record the stream processed was tracked before its agent saw it; a skipped one never was. The
    generation and flow checks keep the rule to rebalances (a record that fails to decode is acked untracked
    too, and must stay acked or its partition would never commit again).
    """
    if message.tracked:
        return False
    return bool(message.generation_id != app.consumer_generation_id or not app.flow_control.is_active())


class DrainingProducerBuffer(ProducerBuffer):
    """Faust's producer buffer (the table's changelog writes), whose flush returns only when every write put
    in it has been handed to aiokafka, however long a write takes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.in_flight = 0  # writes taken out of the queue and not yet handed to aiokafka

    async def _send_pending(self, fut: Any) -> None:
        # Counted before the first await: the write leaves the queue in the same step (no moment when it is
        # neither queued nor counted, which is when the flush would see an empty buffer and return).
        self.in_flight += 1
        try:
            await super()._send_pending(fut)
        finally:
            self.in_flight -= 1

    @property
    def unsent(self) -> int:
        return self.size + self.in_flight

    async def flush(self) -> None:
        if self.app is None or self.app.conf.producer_threaded or self.state != "running":
            # Threaded producers drain their own queue; a stopped buffer raises as Faust's does.
            await super().flush()
            return
        started, writes, longest_wait = time.monotonic(), self.unsent, 0.0
        while self.unsent:
            self.message_sent.clear()
            waited_from = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                # Faust's flush returns when this wait exceeds 0.1 s; a timeout here only re-checks (and the
                # state: a buffer stopped meanwhile would never send the rest).
                await asyncio.wait_for(self.message_sent.wait(), timeout=1.0)
            longest_wait = max(longest_wait, time.monotonic() - waited_from)
            if self.state != "running" and self.unsent:
                raise RuntimeError(f"cannot flush: the producer buffer stopped with {self.unsent} writes")
        if longest_wait > STALL_S:
            log.info(
                "flush of %d buffered writes took %.2f s, %.2f s without one handed on: Faust's own flush "
                "would have let the commit go ahead without them",
                writes,
                time.monotonic() - started,
                longest_wait,
            )


class DrainingProducer(faust_aiokafka.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Faust's __init__ builds its buffer unconditionally; swapped before the producer starts (the buffer
        # becomes a runtime dependency in on_start, so the one built there never runs).
        self.buffer = DrainingProducerBuffer(loop=self.loop, beacon=self.beacon)
        if self.threaded_producer is not None:
            self.buffer.threaded_producer = self.threaded_producer
        self.buffer.app = self.app


class RebalanceSafeTransport(faust_aiokafka.Transport):
    Consumer = RebalanceSafeConsumer
    Producer = DrainingProducer
