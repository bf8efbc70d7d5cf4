"""A model loaded off the event loop, and loaded again until it loads.

The aggregator scores windows on Faust's event loop. Loading M1 there, on the first window it scored, stopped
the loop for 9-19 s on two busy cores: no consumer heartbeats, no timers, no liveness beat. And a load that
failed (M1's directory missing, or being rebuilt) raised inside a record's handler, which dead-lettered a
valid query for what was the machine's fault, and did so again for every window after it.

``BackgroundLoad`` runs the load in a worker thread, from the moment the worker starts, and retries a failed
load with backoff. Whoever needs the model awaits it, so a record waits (not acknowledged, nothing
dead-lettered) until the model is there, and ``check`` gives readiness the reason it is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger("qrloop.aggregator")

T = TypeVar("T")


class BackgroundLoad(Generic[T]):
    """``load()`` run once in a thread, retried after ``initial_s``, doubling up to ``max_s``, until it
    returns. ``start`` and ``get`` need a running event loop."""

    def __init__(
        self,
        name: str,
        load: Callable[[], T],
        initial_s: float,
        max_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self._load = load
        self._initial_s = initial_s
        self._max_s = max_s
        self._sleep = sleep
        self._task: asyncio.Task[T] | None = None
        self.attempts = 0
        self.last_error: str | None = None

    def start(self) -> None:
        """Begin loading (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._load_until_loaded())

    async def get(self) -> T:
        """The loaded value, waiting for it. Shielded: a waiter that is cancelled (an agent stopping) does
        not cancel the load that other waiters share."""
        self.start()
        assert self._task is not None
        return await asyncio.shield(self._task)

    def check(self) -> str:
        """Readiness: a short detail when loaded; raises while loading or after a failed attempt."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            return f"{self.name} loaded after {self.attempts} attempt(s)"
        if self.last_error is not None:
            raise RuntimeError(f"{self.name} failed to load ({self.attempts} attempt(s)): {self.last_error}")
        raise RuntimeError(f"{self.name} loading" if self._task is not None else f"{self.name} not started")

    async def _load_until_loaded(self) -> T:
        delay = self._initial_s
        loop = asyncio.get_running_loop()
        while True:
            self.attempts += 1
            try:
                value = await loop.run_in_executor(None, self._load)
            except Exception as exc:  # whatever the load raises, the machine is to blame: try again
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "%s did not load (attempt %d): %s; retrying in %.1f s",
                    self.name,
                    self.attempts,
                    self.last_error,
                    delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, self._max_s)
                continue
            self.last_error = None
            log.info("%s loaded (attempt %d)", self.name, self.attempts)
            return value
