"""Whether an aggregator worker still handles the input records waiting for it: a wedge detector.

A worker that stops handling its partitions without crashing or blocking its event loop looks healthy to
every other check (the heartbeat is beaten by a timer, the agents' tasks are alive), and its records wait
for good: nothing reads them, and nothing commits them either, so nothing is lost, but no pair comes out.
One CI run saw it: after a rebalance one worker handled none of its two partitions' new records for the
test's remaining 3 minutes, and Faust logged nothing about it.

``InputProgress`` is the pure bookkeeping: the agents record each record they have handled, a timer reports
the partitions' end offsets, and a partition that has had records waiting past the last one handled, with
none handled for ``stall_after_s``, is stalled. The aggregator then logs what it can see (flow, pauses,
the tasks' stacks) and stops beating its heartbeat, so ``/healthz`` fails and the supervisor restarts it:
the restarted worker reads the waiting records from the committed offsets.

A rebalance starts every partition's clock afresh (its recovery may take long, and reads from the committed
offsets again), and so does an end-offset query that failed (the broker, not the worker). A rebalance that
never ends (Faust's recovery hung: the flow stays stopped) is a wedge too, on its own, longer limit.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Partition = TypeVar("Partition", bound=Hashable)


@dataclass
class InputProgress(Generic[Partition]):
    """Per input partition (any hashable key, Faust's ``TP`` in the worker): the offset last handled since the
    partition was assigned, and since when it has had records waiting with none handled."""

    handled: dict[Partition, int] = field(default_factory=dict)
    waiting_since: dict[Partition, float] = field(default_factory=dict)
    stalled: dict[Partition, float] = field(default_factory=dict)  # as the last observation found them
    rebalancing_since: float | None = None
    rebalance_stuck: bool = False

    @property
    def wedged(self) -> bool:
        return bool(self.stalled) or self.rebalance_stuck

    def record(self, partition: Partition, offset: int) -> None:
        self.handled[partition] = offset
        self.waiting_since.pop(partition, None)  # progress: the clock starts again at the next observation

    def restart(self) -> None:
        """Forget what was handled and waited for: after a rebalance the worker reads from the committed
        offsets again."""
        self.handled.clear()
        self.waiting_since.clear()
        self.stalled.clear()

    def rebalancing(self, now: float, stuck_after_s: float) -> float:
        """Note a rebalance under way (the partitions' clocks start afresh); returns how long it has lasted"""
        self.restart()
        if self.rebalancing_since is None:
            self.rebalancing_since = now
        lasted = now - self.rebalancing_since
        self.rebalance_stuck = lasted >= stuck_after_s
        return lasted

    def next_offset(self, partition: Partition, committed: int | None) -> int:
        """The first offset not yet handled: past the last one handled, or the committed one."""
        after_handled = self.handled[partition] + 1 if partition in self.handled else 0
        return max(after_handled, committed or 0)

    def observe(
        self,
        now: float,
        ends: Mapping[Partition, int],
        committed: Mapping[Partition, int | None],
        stall_after_s: float,
    ) -> dict[Partition, float]:
        """Note which of the assigned partitions (the keys of ``ends``, their end offsets) have records
        waiting; returns the stalled ones with how long they have waited with none handled. Outside a
        rebalance: it ends the one noted."""
        self.rebalancing_since, self.rebalance_stuck = None, False
        for gone in set(self.waiting_since) - set(ends):
            del self.waiting_since[gone]
        stalled: dict[Partition, float] = {}
        for partition, end in ends.items():
            if end <= self.next_offset(partition, committed.get(partition)):
                self.waiting_since.pop(partition, None)
                continue
            waited = now - self.waiting_since.setdefault(partition, now)
            if waited >= stall_after_s:
                stalled[partition] = waited
        self.stalled = stalled
        return stalled
