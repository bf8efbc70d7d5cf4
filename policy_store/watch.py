"""Alias change notification by polling, which works the same on SQLite and PostgreSQL.

Each poll is one aggregate over the tiny alias table (``PolicyStore.alias_generation``); only when that
number moved does the watcher read the alias and, if it now points elsewhere, call back. At the default
0.5 s interval a move is seen well within a second. (PostgreSQL LISTEN/NOTIFY would push instead of poll,
but it needs a dedicated connection and still a poll fallback for SQLite; at two queries a second the
poll is cheap enough to be the only mechanism.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from policy_store.entities import PolicyVersion
from policy_store.store import PolicyStore

log = logging.getLogger(__name__)


class AliasWatcher:
    """Calls ``callback(version)`` from a daemon thread whenever ``alias`` starts pointing at another version.

    The state at ``start()`` is the baseline (``fire_initial=True`` also reports it). A callback that raises
    is logged and retried at the next poll, so a failed load is not silently skipped; database errors are
    logged and polling continues (e.g. across a PostgreSQL restart).
    """

    def __init__(
        self,
        store: PolicyStore,
        alias: str,
        callback: Callable[[PolicyVersion], None],
        interval: float = 0.5,
        *,
        fire_initial: bool = False,
    ) -> None:
        self.store = store
        self.alias = alias
        self.callback = callback
        self.interval = interval
        self.fire_initial = fire_initial
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation: int | None = None
        self.current: int | None = None  # version id last reported (or the baseline)

    def start(self) -> AliasWatcher:
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        # Read the baseline synchronously: a move made right after start() returns is then always seen.
        self._generation = self.store.alias_generation()
        record = self.store.aliases().get(self.alias)
        if not self.fire_initial:
            self.current = record.version_id if record else None
        else:
            self._generation = None  # forces the first poll to report the current holder
        self._thread = threading.Thread(target=self._run, name=f"alias-watcher-{self.alias}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> AliasWatcher:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("alias watcher %r: poll failed; retrying", self.alias)
            self._stop.wait(self.interval)

    def poll(self) -> bool:
        """One check (public so a caller without a thread can drive it); True if the callback ran."""
        generation = self.store.alias_generation()
        if generation == self._generation:
            return False
        record = self.store.aliases().get(self.alias)
        if record is None or record.version_id == self.current:
            self._generation = generation
            return False
        version = self.store.get(record.version_id)
        try:
            self.callback(version)
        except Exception:
            # Leave generation/current unchanged so the next poll tries again.
            log.exception("alias watcher %r: callback failed for version %d", self.alias, version.id)
            return False
        self._generation, self.current = generation, version.id
        return True
