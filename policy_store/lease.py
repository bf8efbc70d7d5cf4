"""Leases with fencing epochs: one active holder per name (e.g. one learner per lineage).

A lease is a row ``(name, holder, epoch, expires_at)`` in the store's database. Whoever holds it renews it
well before ``expires_at``; when a holder dies its lease expires and another candidate takes it over, which
bumps ``epoch``. The epoch is the *fencing token*: a holder that was paused (GC, swap, a partition) past its
expiry and taken over still believes it holds the lease, so every write it makes under the lease must carry
its epoch and be checked *inside the write's own transaction* (:meth:`Leases.fence`, e.g. from
``PolicyStore.publish(extra_sql=...)``). The database then refuses the stale write with
:class:`~policy_store.errors.LeaseLostError`; nothing depends on the stale holder noticing in time.

Locking: every operation is one write transaction that locks the lease row — ``SELECT ... FOR UPDATE`` on
PostgreSQL, the store's ``BEGIN IMMEDIATE`` write lock on SQLite (where ``FOR UPDATE`` renders as nothing) —
so a takeover and a fenced publish are serialised: the publish commits under the old epoch before the
takeover, or sees the new epoch and is refused.

Expiry is judged by the clock of the process that wants the lease, so hosts' clocks must agree to well
within the lease duration (NTP does); the epoch check, which is what guarantees safety, needs no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from policy_store.errors import LeaseLostError, PolicyStoreError
from policy_store.models import SqlLease, utcnow
from policy_store.store import PolicyStore

NEVER = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Lease:
    """A held lease: the token a holder passes to :meth:`Leases.fence` with each fenced write."""

    name: str
    holder: str
    epoch: int
    expires_at: datetime


class Leases:
    """Acquire, renew, release and fence leases in ``store``'s database (table ``leases``)."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store

    def try_acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if it is free, expired or already ``holder``'s; None if someone else holds it.

        A change of holder (and a re-acquire after a release or expiry) bumps the epoch, fencing off
        everything the previous holding wrote from now on.
        """
        _check_ttl(ttl_s)
        with self.store.write_session() as session:
            row = _locked_row(session, name)
            now = utcnow()
            held_by_other = row.holder not in (None, holder) and row.expires_at > now
            if held_by_other:
                return None
            if row.holder != holder or row.expires_at <= now:
                row.epoch += 1
                row.acquired_at = now
            row.holder = holder
            row.expires_at = now + timedelta(seconds=ttl_s)
            return _lease(row)

    def renew(self, lease: Lease, ttl_s: float) -> Lease:
        """Extend a held lease; :class:`LeaseLostError` if its epoch moved on (another holder took it)."""
        _check_ttl(ttl_s)
        with self.store.write_session() as session:
            row = _fenced_row(session, lease)
            row.expires_at = utcnow() + timedelta(seconds=ttl_s)
            return _lease(row)

    def release(self, lease: Lease) -> bool:
        """Give the lease up at once (a clean stop: a standby need not wait for the expiry).

        Returns False, changing nothing, when the lease had already been taken over."""
        with self.store.write_session() as session:
            try:
                row = _fenced_row(session, lease)
            except LeaseLostError:
                return False
            row.holder = None
            row.expires_at = utcnow()
            return True

    def current(self, name: str) -> Lease | None:
        """The lease's holder now, or None when it is free (never taken, released or expired)."""
        with self.store.read_session() as session:
            row = session.get(SqlLease, name)
            if row is None or row.holder is None or row.expires_at <= utcnow():
                return None
            return _lease(row)

    @staticmethod
    def fence(session: Session, lease: Lease) -> None:
        """Inside another write transaction: lock the lease row and refuse unless ``lease`` is current.

        Raises :class:`LeaseLostError`, which rolls the caller's transaction back. A lease past its expiry
        but not taken over is still current: the epoch, not the clock, decides."""
        _fenced_row(session, lease)


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise PolicyStoreError(f"a lease needs a positive duration, not {ttl_s}")


def _locked_row(session: Session, name: str) -> SqlLease:
    """The lease row, created free if missing, locked for this transaction."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # ON CONFLICT DO NOTHING: two first-time acquirers on PostgreSQL both insert; one row results and both
    # then queue on its row lock below instead of one failing on the primary key.
    session.execute(
        insert(SqlLease)
        .values(name=name, holder=None, epoch=0, expires_at=NEVER, acquired_at=NEVER)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    query = sa.select(SqlLease).where(SqlLease.name == name).with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


def _fenced_row(session: Session, lease: Lease) -> SqlLease:
    query = sa.select(SqlLease).where(SqlLease.name == lease.name).with_for_update()
    row = session.scalars(query.execution_options(populate_existing=True)).one_or_none()
    if row is None or row.epoch != lease.epoch or row.holder != lease.holder:
        now_held = "nobody" if row is None or row.holder is None else f"{row.holder} (epoch {row.epoch})"
        raise LeaseLostError(
            f"lease {lease.name!r} of epoch {lease.epoch} held by {lease.holder} is no longer current: "
            f"now held by {now_held}; the write was refused"
        )
    return row


def _lease(row: SqlLease) -> Lease:
    assert row.holder is not None
    return Lease(row.name, row.holder, row.epoch, row.expires_at)
