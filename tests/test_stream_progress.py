"""The aggregator's wedge check (streams.progress): a partition stalls only while records wait past the last
one handled, for the whole of ``stall_after_s``, outside a rebalance."""

from __future__ import annotations

import asyncio

from streams.aggregator import awaiting
from streams.progress import InputProgress

STALL_S = 60.0


def test_records_waiting_with_none_handled_stall_after_the_limit_and_not_before() -> None:
    progress: InputProgress[str] = InputProgress()
    progress.record("q0", 9)  # handled up to 9: offsets 10.. are waiting once the end passes 10
    assert progress.observe(0.0, {"q0": 15}, {}, STALL_S) == {}
    assert progress.observe(59.0, {"q0": 20}, {}, STALL_S) == {}
    assert progress.observe(61.0, {"q0": 20}, {}, STALL_S) == {"q0": 61.0}
    assert progress.stalled == {"q0": 61.0}


def test_a_handled_record_starts_the_clock_again() -> None:
    progress: InputProgress[str] = InputProgress()
    progress.observe(0.0, {"q0": 5}, {}, STALL_S)
    progress.record("q0", 0)  # slow, but moving
    assert progress.observe(61.0, {"q0": 5}, {}, STALL_S) == {}, "waiting since 61 s only"
    assert progress.observe(121.0, {"q0": 5}, {}, STALL_S) == {"q0": 60.0}


def test_a_partition_caught_up_never_stalls_however_long_it_is_quiet() -> None:
    progress: InputProgress[str] = InputProgress()
    progress.record("q0", 41)
    for now in (0.0, 100.0, 10_000.0):
        assert progress.observe(now, {"q0": 42}, {}, STALL_S) == {}


def test_with_nothing_handled_since_the_assignment_the_committed_offset_is_where_reading_starts() -> None:
    progress: InputProgress[str] = InputProgress()
    # q0 committed up to its end: nothing waits. q1 committed at 3 of 7: four records wait. q2 has nothing
    # committed: all of it waits.
    ends, committed = {"q0": 7, "q1": 7, "q2": 2}, {"q0": 7, "q1": 3, "q2": None}
    progress.observe(0.0, ends, committed, STALL_S)
    assert set(progress.observe(60.0, ends, committed, STALL_S)) == {"q1", "q2"}
    assert progress.next_offset("q1", 3) == 3
    progress.record("q1", 6)
    assert progress.next_offset("q1", 3) == 7


def test_a_rebalance_forgets_and_unassigned_partitions_are_dropped() -> None:
    progress: InputProgress[str] = InputProgress()
    progress.record("q0", 50)
    progress.observe(0.0, {"q0": 60, "q1": 5}, {}, STALL_S)
    assert set(progress.observe(60.0, {"q0": 60, "q1": 5}, {}, STALL_S)) == {"q0", "q1"}
    progress.restart()
    assert (progress.handled, progress.waiting_since, progress.stalled) == ({}, {}, {})
    assert progress.observe(61.0, {"q0": 60}, {"q0": 55}, STALL_S) == {}, "its clock starts at 61 s"
    assert progress.waiting_since == {"q0": 61.0}, "q1 is no longer assigned: forgotten"
    progress.restart()
    assert progress.waiting_since == {}


def test_the_stall_report_names_where_each_task_waits_innermost_last() -> None:
    async def innermost(event: asyncio.Event) -> None:
        await event.wait()

    async def outer(event: asyncio.Event) -> None:
        await innermost(event)

    async def main() -> list[str]:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event), name="wedged")
        await asyncio.sleep(0)
        chain = awaiting(task.get_coro())
        event.set()
        await task
        return chain

    chain = asyncio.run(main())
    names = [where.split(":")[0] for where in chain]
    assert names[:3] == ["outer", "innermost", "wait"], chain


def test_a_rebalance_that_never_ends_is_a_wedge_of_its_own_and_ends_with_the_next_observation() -> None:
    progress: InputProgress[str] = InputProgress()
    progress.record("q0", 3)
    assert progress.rebalancing(100.0, stuck_after_s=600) == 0.0
    assert progress.handled == {}, "the partitions' clocks start afresh"
    assert progress.rebalancing(699.0, stuck_after_s=600) == 599.0 and not progress.wedged
    assert progress.rebalancing(701.0, stuck_after_s=600) == 601.0 and progress.wedged
    progress.observe(702.0, {"q0": 4}, {"q0": 4}, STALL_S)
    assert not progress.wedged and progress.rebalancing_since is None
    assert progress.rebalancing(800.0, stuck_after_s=600) == 0.0, "the next rebalance is timed from its start"
