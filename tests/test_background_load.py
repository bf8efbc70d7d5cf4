"""``streams.background_load``: the aggregator's M1 loads in a thread, and a failed load is retried."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streams.background_load import BackgroundLoad


def test_a_failed_load_is_retried_with_doubling_delays_and_readiness_says_why() -> None:
    calls: list[str] = []
    delays: list[float] = []
    seen_by_readiness: list[str] = []

    def flaky() -> str:
        calls.append(threading.current_thread().name)
        if len(calls) < 4:
            raise FileNotFoundError(f"no M1 yet ({len(calls)})")
        return "model"

    async def scenario() -> str:
        async def sleep(seconds: float) -> None:
            delays.append(seconds)
            with pytest.raises(RuntimeError) as failed:
                load.check()
            seen_by_readiness.append(str(failed.value))

        load = BackgroundLoad("M1", flaky, initial_s=0.5, max_s=1.5, sleep=sleep)
        with pytest.raises(RuntimeError, match="M1 not started"):
            load.check()
        value = await load.get()
        assert load.check() == "M1 loaded after 4 attempt(s)"
        assert await load.get() == value  # loaded once: a later waiter gets the same value, no new load
        return value

    assert asyncio.run(scenario()) == "model"
    assert len(calls) == 4
    assert delays == [0.5, 1.0, 1.5]  # doubled, capped at max_s
    assert seen_by_readiness[0] == "M1 failed to load (1 attempt(s)): FileNotFoundError: no M1 yet (1)"
    assert seen_by_readiness[2].startswith("M1 failed to load (3 attempt(s))")
    assert all(name != threading.main_thread().name for name in calls)  # never on the event loop's thread


def test_the_event_loop_runs_while_the_model_loads() -> None:
    """A load of 0.6 s: the loop's other coroutines (Faust's heartbeats, timers, the liveness beat) keep
    running meanwhile. Run on the loop itself, the load would let the ticker run only after it."""

    def slow() -> str:
        time.sleep(0.6)
        return "model"

    async def scenario() -> tuple[int, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.02)

        load = BackgroundLoad("M1", slow, initial_s=1.0, max_s=1.0)
        beating = asyncio.create_task(ticker())
        load.start()
        await asyncio.sleep(0)  # the load has begun
        ticks_at_start = ticks
        await load.get()
        during = ticks - ticks_at_start
        stop.set()
        await beating
        return ticks_at_start, during

    _, during = asyncio.run(scenario())
    assert during >= 10, during  # ~30 ticks of 20 ms in 0.6 s; none if the load held the loop


def test_a_cancelled_waiter_does_not_cancel_the_load_others_wait_for() -> None:
    release = threading.Event()

    def blocked() -> str:
        release.wait(5)
        return "model"

    async def scenario() -> str:
        load = BackgroundLoad("M1", blocked, initial_s=1.0, max_s=1.0)
        first = asyncio.create_task(load.get())
        await asyncio.sleep(0.05)
        first.cancel()  # an agent stopping while it waits
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        return await asyncio.wait_for(load.get(), 5)

    assert asyncio.run(scenario()) == "model"
