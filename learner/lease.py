"""One active learner per lineage: the learner's side of ``policy_store.lease``.

Any number of ``qrloop learn`` processes may run for one lineage (``dpo.learner_name``). One holds the lease
and trains; the others are *standbys* that poll for it. The holder renews it every ``dpo.lease_s / 3`` from a
background thread (a long DPO step does not let it lapse) and fences every publish with its epoch, inside the
publish transaction; so when a paused holder is taken over, its late publish is refused by the database
(``LeaseLostError``) and it goes back to standby, while the new holder resumes from the offsets stored with
the lineage's latest version. A standby takes over at most ``lease_s`` (plus one poll, ``lease_s / 5``) after
the holder's last renewal, i.e. after it died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from policy_store import Lease, LeaseLostError, Leases, PolicyStore
from qrloop.settings import Settings

log = logging.getLogger("qrloop.learner.lease")


def lease_name(settings: Settings) -> str:
    return f"learner:{settings.dpo.learner_name}"


def holder_id() -> str:
    """Unique per process start: a restarted learner is a new holder, never mistaken for its former self."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LearnerLease:
    """Wait for the lineage's lease, keep it renewed, fence publishes with it, release it on a clean stop."""

    def __init__(self, store: PolicyStore, name: str, ttl_s: float, holder: str | None = None) -> None:
        self.leases = Leases(store)
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or holder_id()
        self.held: Lease | None = None
        self.lost = threading.Event()  # set when a renewal or a fenced publish found the lease taken over
        self._renewing = threading.Event()

    @classmethod
    def for_settings(cls, settings: Settings, store: PolicyStore) -> LearnerLease:
        return cls(store, lease_name(settings), settings.dpo.lease_s)

    @property
    def epoch(self) -> int:
        return self.held.epoch if self.held else 0

    def wait_until_acquired(self, stop: threading.Event, on_poll: Callable[[], object] | None = None) -> bool:
        """Block until this process holds the lease (True) or ``stop`` is set (False); ``on_poll`` is called
        at every try (the learner's liveness heartbeat: a standby that waits is not stuck)."""
        announced = False
        while not stop.is_set():
            if on_poll is not None:
                on_poll()
            try:
                self.held = self.leases.try_acquire(self.name, self.holder, self.ttl_s)
            except SQLAlchemyError as exc:  # a database blip is no reason to die: try again next poll
                log.warning("lease %s: could not ask the database (%s); retrying", self.name, exc)
                self.held = None
            if self.held is not None:
                log.info("lease %s acquired by %s, epoch %d", self.name, self.holder, self.held.epoch)
                self.lost.clear()
                self._start_renewing()
                return True
            if not announced:
                holder = self.leases.current(self.name)
                log.info("standby: lease %s is held by %s", self.name, holder.holder if holder else "?")
                announced = True
            stop.wait(self.ttl_s / 5)
        return False

    def fence(self, session: Session) -> None:
        """In the publish transaction: refuse it unless this process's epoch is still the current one."""
        if self.held is None:
            raise LeaseLostError(f"lease {self.name}: publishing without holding it")
        try:
            Leases.fence(session, self.held)
        except LeaseLostError:
            self.lost.set()
            raise

    def release(self) -> None:
        """On a clean stop: hand the lease over now rather than make a standby wait out ``lease_s``."""
        self._renewing.clear()
        if self.held is not None and not self.lost.is_set():
            self.leases.release(self.held)
            log.info("lease %s released (epoch %d)", self.name, self.held.epoch)
        self.held = None

    def _start_renewing(self) -> None:
        self._renewing.set()
        threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True).start()

    def _renew_loop(self) -> None:
        held = self.held
        while self._renewing.is_set() and held is not None and held is self.held:
            if self.lost.wait(self.ttl_s / 3):
                return
            if held is not self.held or not self._renewing.is_set():
                return
            try:
                self.held = held = self.leases.renew(held, self.ttl_s)
            except LeaseLostError as exc:
                log.warning("%s; stopping after the step in progress", exc)
                self.lost.set()
                return
            except SQLAlchemyError as exc:
                # The lease may lapse if this persists; the fenced publish keeps that safe.
                log.warning("lease %s: renewal failed (%s); retrying", self.name, exc)
