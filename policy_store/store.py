"""The policy store: the one API the learner, the rewriter and the canary share.

Every public method is one database transaction. Weights live in the content-addressed blob store
(``blobs.py``); rows only reference them by digest, so a version is immutable and an alias move is a
one-row update plus one audit row.

Locking, and why:

- SQLite: every write transaction starts with ``BEGIN IMMEDIATE``, taking the database write lock up front.
  Writers therefore serialise (readers are never blocked, thanks to WAL), and a read-then-write
  (rollback's history replay, reject's alias check) cannot be overtaken by another writer.
- PostgreSQL: ids come from sequences. ``publish`` and ``gc`` additionally take one transaction-scoped
  advisory lock, so versions commit in id order (a reader that saw version N never later sees a new id
  below N) and gc never deletes a blob that a concurrent publish is about to reference. Alias moves lock
  the alias row (``SELECT ... FOR UPDATE``), so concurrent moves of one alias queue up and each sees its
  predecessor's result; status checks lock the version row, so ``reject`` and ``set_alias`` cannot both
  win.
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from policy_store.blobs import BlobStore, digest_dir
from policy_store.db import make_engine
from policy_store.entities import (
    ADAPTER_BASE_TAG,
    KINDS,
    STATUSES,
    AliasRecord,
    AuditAction,
    AuditEntry,
    GcReport,
    PolicyVersion,
    version_tag,
)
from policy_store.errors import (
    AliasPinnedError,
    DestinationNotEmptyError,
    NoPreviousVersionError,
    PolicyStoreError,
    StaleVerdictError,
    UnknownAliasError,
    UnknownVersionError,
    VersionInUseError,
    VersionNotReadyError,
)
from policy_store.models import SqlAuditEntry, SqlPolicyAlias, SqlPolicyVersion, utcnow
from policy_store.retention import RetentionPlan, RetentionRule, plan_retention

log = logging.getLogger(__name__)

VersionRef = int | PolicyVersion
# Called with the open session and the new version's id, inside the publish transaction.
ExtraSql = Callable[[Session, int], object]
LockMode = Literal["share", "update"] | None

# Key of the PostgreSQL advisory lock that serialises publish and gc ("qrlp").
PUBLISH_LOCK_KEY = 0x71726C70
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,127}$")
ALIAS_MOVES: tuple[AuditAction, ...] = ("set_alias", "rollback")
PUBLISH_ATTEMPTS = 3


@dataclass(frozen=True)
class RetentionReport:
    """What ``PolicyStore.apply_retention`` kept (and why), archived, and freed."""

    plan: RetentionPlan
    archived: list[int]
    skipped: list[int]  # planned for archiving, but an alias moved onto them meanwhile
    gc: GcReport


class _BlobVanished(Exception):
    """The blob vanished (a concurrent gc) between writing it and locking for the insert: write it again."""


def _version_id(version: VersionRef) -> int:
    return version.id if isinstance(version, PolicyVersion) else int(version)


def _check_alias_name(alias: str) -> str:
    if not ALIAS_NAME.match(alias):
        raise PolicyStoreError(
            f"invalid alias name {alias!r}: start with a letter; letters, digits, '_', '.', '-'; at most 128"
        )
    return alias


def _json_object(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy. NaN/inf are refused here because PostgreSQL's JSONB refuses them later, obscurely."""
    data = dict(value or {})
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PolicyStoreError(f"{name} must be a JSON object without NaN/inf: {exc}") from exc
    return data


def _check_offsets(offsets: Mapping[str, int] | None) -> dict[str, int]:
    """Offsets are Kafka positions ``{"topic:partition": next_offset}``; a malformed key would silently
    resume the learner from the wrong place, so the shape is enforced."""
    result: dict[str, int] = {}
    for key, value in (offsets or {}).items():
        topic, sep, partition = str(key).rpartition(":")
        if not (sep and topic and partition.isdigit()):
            raise PolicyStoreError(f"offset key {key!r} is not 'topic:partition'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PolicyStoreError(f"offset {key!r}={value!r} is not a non-negative integer")
        result[str(key)] = value
    return result


def _refuse_if_pinned(row: SqlPolicyAlias, what: str) -> None:
    if row.pinned_by is not None:
        reason = f" ({row.pin_reason})" if row.pin_reason else ""
        raise AliasPinnedError(
            f"alias {row.alias!r} is pinned to version {row.version_id} by {row.pinned_by}{reason}; "
            f"refusing to {what} (`qrloop policy unpin {row.alias}` first)"
        )


def _install_sqlite_begin(engine: Engine) -> None:
    """Take over BEGIN from Python's sqlite3 module (which delays it until the first DML statement).

    Write sessions (execution option ``qrloop_write``) begin with ``BEGIN IMMEDIATE``: they hold SQLite's
    write lock from their first statement, so read-then-write sequences are serialised. Reads begin with a
    plain deferred ``BEGIN`` and, under WAL, never wait for writers.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("qrloop_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _first_sqlite_connect(engine: Engine, attempts: int = 100, delay_s: float = 0.05) -> None:
    """Open the first connection, retrying while the database is locked.

    A fresh database (e.g. just created by Alembic) is not yet in WAL mode, and switching it needs an
    exclusive lock that SQLite refuses at once, without waiting out the busy timeout, when another process
    is doing the same or already writing. Processes starting together (learner, rewriter, canary) hit that;
    once the file is in WAL mode (it stays so) the pragma is a no-op and this succeeds first time.
    """
    for attempt in range(attempts):
        try:
            with engine.connect():
                return
        except sa.exc.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay_s)


def _adapter_base_id(tags: Mapping[str, Any]) -> int:
    base = version_tag(tags, ADAPTER_BASE_TAG)
    if base is None:
        raise PolicyStoreError(
            f"a 'lora' version needs tags[{ADAPTER_BASE_TAG!r}]: the id of the 'full' version it adapts"
        )
    return base


def _adapters_over(session: Session, base_id: int) -> list[int]:
    """The versions not archived that are adapters applying to ``base_id``: they need its weights to load."""
    query = sa.select(SqlPolicyVersion.id, SqlPolicyVersion.tags).where(
        SqlPolicyVersion.kind == "lora", SqlPolicyVersion.status != "archived"
    )
    return sorted(
        vid for vid, tags in session.execute(query) if version_tag(tags or {}, ADAPTER_BASE_TAG) == base_id
    )


def _check_adapter_base(session: Session, base_id: int) -> None:
    """In the publish transaction: the adapter's base exists, is a whole model, and still has weights. Share-
    locked: a concurrent archive of the base (which looks for its adapters) waits for this adapter, or this
    publish waits and then sees the base archived."""
    base = session.get(SqlPolicyVersion, base_id, with_for_update={"read": True})
    if base is None:
        raise UnknownVersionError(f"unknown base version {base_id}")
    if base.kind != "full" or base.status == "archived":
        raise PolicyStoreError(
            f"base version {base_id} is {base.status} and of kind {base.kind!r}: an adapter needs a ready "
            "'full' version to apply to"
        )


class PolicyStore:
    """Versions, aliases and audit log in one SQL database; weights as content-addressed blobs."""

    def __init__(self, url: str, blob_dir: Path | str) -> None:
        self.url = url
        self.blobs = BlobStore(Path(blob_dir))
        self._engine = make_engine(url)
        self._backend = self._engine.dialect.name
        if self._backend == "sqlite":
            _install_sqlite_begin(self._engine)
            _first_sqlite_connect(self._engine)
        self._read_sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self._engine.execution_options(qrloop_write=True), expire_on_commit=False
        )

    @property
    def blob_dir(self) -> Path:
        return self.blobs.root

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> PolicyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PolicyStore({self._engine.url.render_as_string(hide_password=True)!r}, {str(self.blob_dir)!r})"
        )

    # ------------------------------------------------------------------------------------------ transactions

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only session on the store's database, for tables beside it (the learner's ledger)."""
        with self._reading() as session:
            yield session

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite) for tables beside the store's (leases)."""
        with self._writing() as session:
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _writing(self, *, exclusive: bool = False) -> Iterator[Session]:
        """A write transaction, locked before the caller's first statement (see the module docstring).

        ``exclusive``: also serialise against every other publish/gc (PostgreSQL advisory lock; SQLite's
        write lock already does)."""
        with self._write_sessions() as session, session.begin():
            connection = session.connection()  # emits BEGIN (IMMEDIATE on SQLite) now, not lazily
            if exclusive and self._backend == "postgresql":
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(PUBLISH_LOCK_KEY)))
            yield session

    # -------------------------------------------------------------------------------------------- publishing

    def publish(
        self,
        weights_dir: Path | str,
        *,
        parent: VersionRef | None = None,
        base_model: str,
        train_steps: int = 0,
        offsets: Mapping[str, int] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        kind: str = "full",
        actor: str = "learner",
        reason: str = "",
        extra_sql: ExtraSql | None = None,
        on_blob_write: Callable[[int], None] | None = None,
        give_away: bool = False,
    ) -> PolicyVersion:
        """Store ``weights_dir`` as a new immutable version.

        The blob is written first (atomic, content-addressed); then one transaction inserts the version row
        and its audit row and runs ``extra_sql(session, version_id)`` — e.g. the learner's consumer offsets —
        so either all of it is committed or none. If anything raises, no version is visible and the blob stays
        unreferenced until ``gc`` removes it. ``on_blob_write(bytes so far)`` follows the blob's write.

        ``give_away``: the caller is done with ``weights_dir`` (a temporary directory of its own). After the
        commit it is renamed into the version's checkout, so the first ``load_dir`` (a server swapping the
        version in) verifies it in place instead of extracting the blob; ``weights_dir`` is gone then,
        unless the rename could not be done.
        """
        if kind not in KINDS:
            raise PolicyStoreError(f"kind must be one of {KINDS}, not {kind!r}")
        if train_steps < 0:
            raise PolicyStoreError(f"train_steps must be >= 0, not {train_steps}")
        if kind == "lora":
            _adapter_base_id(tags or {})  # refused before a blob is written; the base is checked at insert
        fields: dict[str, Any] = {
            "parent_id": None if parent is None else _version_id(parent),
            "base_model": base_model,
            "train_steps": train_steps,
            "kind": kind,
            "offsets": _check_offsets(offsets),
            "metrics": _json_object("metrics", metrics),
            "tags": _json_object("tags", tags),
        }
        for _attempt in range(PUBLISH_ATTEMPTS):
            blob = self.blobs.put_dir(Path(weights_dir), kind=kind, on_write=on_blob_write)
            fields.update(blob_digest=blob.digest, blob_uri=blob.uri, size_bytes=blob.size_bytes)
            try:
                version = self._insert_version(fields, actor=actor, reason=reason, extra_sql=extra_sql)
            except _BlobVanished:
                log.warning(
                    "blob %s was removed by a concurrent gc before publish committed; rewriting", blob
                )
                continue
            if give_away:
                self.blobs.adopt_checkout(Path(weights_dir), blob.digest)
            return version
        raise PolicyStoreError(
            f"publish of {weights_dir}: blob kept vanishing (concurrent gc with no retention?)"
        )

    def _insert_version(
        self, fields: dict[str, Any], *, actor: str, reason: str, extra_sql: ExtraSql | None
    ) -> PolicyVersion:
        with self._writing(exclusive=True) as session:
            # Under the publish/gc lock: a blob present now stays until this row commits.
            if not self.blobs.exists(fields["blob_digest"]):
                raise _BlobVanished()
            parent_id = fields["parent_id"]
            if parent_id is not None and session.get(SqlPolicyVersion, parent_id) is None:
                raise UnknownVersionError(f"unknown parent version {parent_id}")
            if fields["kind"] == "lora":
                _check_adapter_base(session, _adapter_base_id(fields["tags"]))
            row = SqlPolicyVersion(**fields, created_at=utcnow(), status="ready")
            session.add(row)
            session.flush()  # assigns the id
            self._audit(
                session,
                "publish",
                actor=actor,
                reason=reason,
                from_version=parent_id,
                to_version=row.id,
                details={"digest": row.blob_digest, "kind": row.kind, "train_steps": row.train_steps},
            )
            if extra_sql is not None:
                extra_sql(session, row.id)
            session.flush()
            return row.to_entity()

    # ----------------------------------------------------------------------------------------------- reading

    def get(self, version: VersionRef) -> PolicyVersion:
        with self._reading() as session:
            return self._version_row(session, _version_id(version)).to_entity()

    def resolve(self, alias: str) -> PolicyVersion:
        """The version ``alias`` points at."""
        with self._reading() as session:
            row = self._alias_row(session, alias)
            return self._version_row(session, row.version_id).to_entity()

    def latest(self, status: str | None = "ready") -> PolicyVersion | None:
        """The newest version (highest id) with ``status`` (any status if None); None when there is none."""
        found = self.list(status=status, limit=1)
        return found[0] if found else None

    def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> builtins.list[PolicyVersion]:
        if status is not None and status not in STATUSES:
            raise PolicyStoreError(f"status must be one of {STATUSES}, not {status!r}")
        query = sa.select(SqlPolicyVersion)
        if status is not None:
            query = query.where(SqlPolicyVersion.status == status)
        if kind is not None:
            query = query.where(SqlPolicyVersion.kind == kind)
        order = SqlPolicyVersion.id.desc() if newest_first else SqlPolicyVersion.id.asc()
        query = query.order_by(order).limit(limit)
        with self._reading() as session:
            return [row.to_entity() for row in session.scalars(query)]

    def lineage(self, version: VersionRef) -> builtins.list[PolicyVersion]:
        """``version``, its parent, its grandparent, ... up to the root (one recursive query)."""
        vid = _version_id(version)
        chain = sa.select(SqlPolicyVersion.id, SqlPolicyVersion.parent_id, sa.literal(0).label("depth"))
        chain_cte = chain.where(SqlPolicyVersion.id == vid).cte("chain", recursive=True)
        step = sa.select(
            SqlPolicyVersion.id, SqlPolicyVersion.parent_id, (chain_cte.c.depth + 1).label("depth")
        ).join(chain_cte, SqlPolicyVersion.id == chain_cte.c.parent_id)
        chain_cte = chain_cte.union_all(step)
        query = (
            sa.select(SqlPolicyVersion)
            .join(chain_cte, SqlPolicyVersion.id == chain_cte.c.id)
            .order_by(chain_cte.c.depth)
        )
        with self._reading() as session:
            rows = [row.to_entity() for row in session.scalars(query)]
        if not rows:
            raise UnknownVersionError(f"unknown version {vid}")
        return rows

    def aliases(self) -> dict[str, AliasRecord]:
        with self._reading() as session:
            rows = session.scalars(sa.select(SqlPolicyAlias).order_by(SqlPolicyAlias.alias))
            return {row.alias: row.to_entity() for row in rows}

    def history(self, alias: str) -> builtins.list[AuditEntry]:
        """Audit rows about ``alias``, newest first."""
        with self._reading() as session:
            query = (
                sa.select(SqlAuditEntry).where(SqlAuditEntry.alias == alias).order_by(SqlAuditEntry.id.desc())
            )
            rows = [row.to_entity() for row in session.scalars(query)]
            if not rows and session.get(SqlPolicyAlias, alias) is None:
                raise UnknownAliasError(f"unknown alias {alias!r}")
            return rows

    def audit(
        self,
        *,
        action: str | None = None,
        alias: str | None = None,
        version: VersionRef | None = None,
        limit: int | None = 100,
    ) -> builtins.list[AuditEntry]:
        """Audit rows, newest first, optionally about one action / alias / version."""
        query = sa.select(SqlAuditEntry)
        if action is not None:
            query = query.where(SqlAuditEntry.action == action)
        if alias is not None:
            query = query.where(SqlAuditEntry.alias == alias)
        if version is not None:
            vid = _version_id(version)
            query = query.where(sa.or_(SqlAuditEntry.from_version == vid, SqlAuditEntry.to_version == vid))
        query = query.order_by(SqlAuditEntry.id.desc()).limit(limit)
        with self._reading() as session:
            return [row.to_entity() for row in session.scalars(query)]

    # ------------------------------------------------------------------------------------------------ aliases

    def set_alias(
        self,
        alias: str,
        version: VersionRef,
        reason: str = "",
        actor: str = "operator",
        *,
        force: bool = False,
        fence: Callable[[Session], object] | None = None,
    ) -> AuditEntry:
        """Point ``alias`` at ``version`` (creating the alias if new); returns the audit row of the move.

        ``fence(session)`` runs first inside the transaction and may refuse the move by raising (a learner's
        lease check, ``policy_store.lease.Leases.fence``)."""
        _check_alias_name(alias)
        with self._writing() as session:
            if fence is not None:
                fence(session)
            target = self._ready_version(session, _version_id(version), force=force)
            return self._move_alias(session, alias, target.id, "set_alias", actor=actor, reason=reason)

    def rollback(
        self,
        alias: str,
        to: VersionRef | None = None,
        reason: str = "",
        actor: str = "operator",
        *,
        pin: bool = False,
    ) -> AuditEntry:
        """Move ``alias`` back: to ``to`` if given, else to the holder before the current one.

        The alias's holders form a stack replayed from the audit log: ``set_alias`` pushes, ``rollback``
        pops back to its target. So repeated rollbacks keep walking back (v3 → v2 → v1) rather than
        toggling between the last two, and versions rejected since are skipped. ``pin``: also pin the alias
        there, in the same transaction, so no learner or canary moves it off before the operator unpins.
        """
        with self._writing() as session:
            current = self._alias_row(session, alias, lock=True)
            _refuse_if_pinned(current, "roll it back")
            if to is not None:
                target_id = self._ready_version(session, _version_id(to), force=False).id
            else:
                target_id = self._previous_holder(session, alias, current.version_id)
            entry = self._move_alias(session, alias, target_id, "rollback", actor=actor, reason=reason)
            if pin:
                self._set_pin(session, alias, actor=actor, reason=reason)
            return entry

    # --------------------------------------------------------------------------------------------------- pins

    def pin(self, alias: str, reason: str = "", actor: str = "operator") -> AuditEntry:
        """Pin ``alias`` to the version it holds: every move (``set_alias``, ``rollback``, a canary verdict,
        a learner's publish) is refused with :class:`AliasPinnedError` until :meth:`unpin`."""
        with self._writing() as session:
            return self._set_pin(session, alias, actor=actor, reason=reason)

    def unpin(self, alias: str, reason: str = "", actor: str = "operator") -> AuditEntry:
        with self._writing() as session:
            row = self._alias_row(session, alias, lock=True)
            if row.pinned_by is None:
                raise PolicyStoreError(f"alias {alias!r} is not pinned")
            was = {"pinned_by": row.pinned_by, "pin_reason": row.pin_reason or ""}
            row.pinned_by, row.pinned_at, row.pin_reason = None, None, None
            return self._audit(
                session,
                "unpin",
                actor=actor,
                reason=reason,
                alias=alias,
                from_version=row.version_id,
                to_version=row.version_id,
                details=was,
            )

    def _set_pin(self, session: Session, alias: str, *, actor: str, reason: str) -> AuditEntry:
        row = self._alias_row(session, alias, lock=True)
        row.pinned_by, row.pinned_at, row.pin_reason = actor, utcnow(), reason
        return self._audit(
            session,
            "pin",
            actor=actor,
            reason=reason,
            alias=alias,
            from_version=row.version_id,
            to_version=row.version_id,
        )

    def _previous_holder(self, session: Session, alias: str, current_id: int) -> int:
        stack = self._holder_stack(session, alias)
        if not stack or stack[-1] != current_id:
            stack.append(current_id)
        while len(stack) > 1:
            stack.pop()
            candidate = stack[-1]
            row = session.get(SqlPolicyVersion, candidate, with_for_update={"read": True})
            if candidate != current_id and row is not None and row.status == "ready":
                return candidate
        raise NoPreviousVersionError(
            f"alias {alias!r} has no previous ready version to roll back to (it holds version {current_id})"
        )

    def _holder_stack(self, session: Session, alias: str) -> builtins.list[int]:
        moves = session.execute(
            sa.select(SqlAuditEntry.action, SqlAuditEntry.to_version)
            .where(SqlAuditEntry.alias == alias, SqlAuditEntry.action.in_(ALIAS_MOVES))
            .order_by(SqlAuditEntry.id)
        )
        stack: builtins.list[int] = []
        for action, to_version in moves:
            if to_version is None:
                continue
            if action == "rollback" and to_version in stack:
                # Pop back to the target's most recent occurrence: it becomes the top again.
                del stack[len(stack) - stack[::-1].index(to_version) :]
            elif not stack or stack[-1] != to_version:
                stack.append(to_version)
        return stack

    def _move_alias(
        self, session: Session, alias: str, to_id: int, action: AuditAction, *, actor: str, reason: str
    ) -> AuditEntry:
        now = utcnow()
        row = self._find_alias_row(session, alias, lock=True)
        from_id: int | None = None
        if row is None:
            # A new alias. Two creators may race: ON CONFLICT DO NOTHING lets the second one fall through
            # to the locked update below (PostgreSQL waits for the first one to commit before deciding).
            # RETURNING (not rowcount, which ORM-level inserts do not report reliably) says who won.
            insert = postgresql.insert if self._backend == "postgresql" else sqlite.insert
            table = cast(sa.Table, SqlPolicyAlias.__table__)
            created = session.execute(
                insert(table)
                .values(alias=alias, version_id=to_id, updated_at=now, generation=1)
                .on_conflict_do_nothing(index_elements=["alias"])
                .returning(table.c.alias)
            ).first()
            if created is None:
                row = self._alias_row(session, alias, lock=True)
        if row is not None:
            from_id = row.version_id
            # Checked under the row lock: a pin committed before this move is always seen.
            _refuse_if_pinned(row, f"move it to {to_id}")
            if row.version_id != to_id:
                row.version_id = to_id
                row.generation += 1
            row.updated_at = now
        return self._audit(
            session, action, actor=actor, reason=reason, alias=alias, from_version=from_id, to_version=to_id
        )

    # --------------------------------------------------------------------------------------------- statuses

    def reject(
        self, version: VersionRef, reason: str = "", actor: str = "canary", *, force: bool = False
    ) -> PolicyVersion:
        """Mark ``version`` rejected. Refused while an alias holds it, unless ``force`` (aliases stay)."""
        return self._set_status(version, "rejected", "reject", reason=reason, actor=actor, force=force)

    def archive(
        self, version: VersionRef, reason: str = "", actor: str = "operator", *, force: bool = False
    ) -> PolicyVersion:
        return self._set_status(version, "archived", "archive", reason=reason, actor=actor, force=force)

    def _set_status(
        self, version: VersionRef, status: str, action: AuditAction, *, reason: str, actor: str, force: bool
    ) -> PolicyVersion:
        vid = _version_id(version)
        with self._writing() as session:
            # Lock the version first, then look for aliases: a concurrent set_alias (which share-locks the
            # version) either committed before this check and is seen, or waits and then sees the status.
            row = self._version_row(session, vid, lock="update")
            holders = session.scalars(sa.select(SqlPolicyAlias.alias).where(SqlPolicyAlias.version_id == vid))
            held_by = sorted(holders)
            if held_by and not force:
                raise VersionInUseError(
                    f"version {vid} is held by alias(es) {', '.join(held_by)}; move or roll them back first "
                    "(or force)"
                )
            adapters = _adapters_over(session, vid) if status == "archived" else []
            if adapters and not force:
                # Archived weights may be freed by gc, and an adapter cannot load without its base.
                raise VersionInUseError(
                    f"version {vid} is the base of adapter version(s) {', '.join(map(str, adapters))}; "
                    "archive them first (or force)"
                )
            previous = row.status
            row.status = status
            self._audit(
                session,
                action,
                actor=actor,
                reason=reason,
                to_version=vid,
                details={
                    "from_status": previous,
                    "to_status": status,
                    "held_by": held_by,
                    "adapters": adapters,
                },
            )
            session.flush()
            return row.to_entity()

    def record_canary_verdict(
        self,
        version: VersionRef,
        *,
        passed: bool,
        details: Mapping[str, Any] | None = None,
        alias: str | None = None,
        reason: str = "",
        actor: str = "canary",
    ) -> AuditEntry:
        """Write the canary's verdict on ``version`` to the audit log (acting on it is the caller's move)."""
        vid = _version_id(version)
        data = {"passed": passed, **_json_object("details", details)}
        with self._writing() as session:
            self._version_row(session, vid)
            return self._audit(
                session,
                "canary_verdict",
                actor=actor,
                reason=reason,
                alias=alias,
                to_version=vid,
                details=data,
            )

    def conclude_canary(
        self,
        canary_version: VersionRef,
        verdict: Literal["promote", "rollback", "inconclusive"],
        *,
        production_version: VersionRef,
        details: Mapping[str, Any] | None = None,
        production_alias: str = "production",
        canary_alias: str = "canary",
        reason: str = "",
        actor: str = "canary",
    ) -> builtins.list[AuditEntry]:
        """Act on a canary's final verdict in one transaction, so a crash never leaves half of it.

        Writes the verdict's audit row, then *promotes* (``production_alias`` → the canary version), *rolls
        back as worse* (``canary_alias`` → production's version, the canary version marked rejected) or
        ends it *inconclusive* (the same move back, the canary version archived: not shown worse, so not
        rejected). A pinned alias refuses the move (:class:`AliasPinnedError`, nothing changed). The
        analysis compared ``canary_version`` with ``production_version``; if either alias has moved since
        (say the learner published a newer candidate), the verdict is about versions no longer served and
        :class:`StaleVerdictError` is raised with nothing changed. Returns the audit rows.
        """
        cid, pid = _version_id(canary_version), _version_id(production_version)
        passed = {"promote": True, "rollback": False, "inconclusive": None}[verdict]
        data = {"verdict": verdict, "passed": passed, **_json_object("details", details)}
        with self._writing() as session:
            # Versions before aliases, the order set_alias and reject lock in.
            canary_row = self._version_row(session, cid, lock="share" if verdict == "promote" else "update")
            self._ready_version(session, pid, force=False)
            held = {
                alias: self._alias_row(session, alias, lock=True).version_id
                for alias in (production_alias, canary_alias)
            }
            if held != {production_alias: pid, canary_alias: cid}:
                raise StaleVerdictError(
                    f"verdict on canary {cid} vs production {pid}, but the aliases now hold {held}"
                )
            entries = [
                self._audit(
                    session,
                    "canary_verdict",
                    actor=actor,
                    reason=reason,
                    alias=canary_alias,
                    from_version=pid,
                    to_version=cid,
                    details=data,
                )
            ]
            if verdict == "promote":
                if canary_row.status != "ready":
                    raise VersionNotReadyError(f"version {cid} is {canary_row.status}; it cannot be promoted")
                entries.append(
                    self._move_alias(session, production_alias, cid, "set_alias", actor=actor, reason=reason)
                )
            else:
                entries.append(
                    self._move_alias(session, canary_alias, pid, "set_alias", actor=actor, reason=reason)
                )
                holders = session.scalars(
                    sa.select(SqlPolicyAlias.alias).where(SqlPolicyAlias.version_id == cid)
                )
                held_by = sorted(holders)
                if held_by:  # another alias (not ours) serves it: rejecting would strand that alias
                    raise VersionInUseError(f"version {cid} is also held by {', '.join(held_by)}")
                previous = canary_row.status
                status: Literal["rejected", "archived"] = "rejected" if verdict == "rollback" else "archived"
                canary_row.status = status
                entries.append(
                    self._audit(
                        session,
                        "reject" if verdict == "rollback" else "archive",
                        actor=actor,
                        reason=reason,
                        to_version=cid,
                        details={"from_status": previous, "to_status": status, "held_by": held_by},
                    )
                )
            session.flush()
            return entries

    # ------------------------------------------------------------------------------------------------- blobs

    def load_dir(self, version: VersionRef, dest: Path | str | None = None) -> Path:
        """A verified directory with the version's files, ready for ``from_pretrained``.

        Without ``dest`` it is the shared cache ``<blob_dir>/checkout/<digest>``: extracted once, and on
        every later call re-verified in place (its canonical tar stream must hash to the digest) so that a
        modified checkout is never served; a bad checkout is discarded and extracted again from the blob.
        """
        v = self.get(version) if not isinstance(version, PolicyVersion) else version
        label = f"version {v.id}"
        if dest is not None:
            return self.blobs.materialise(v.blob_digest, Path(dest), label=label)
        checkout = self.blobs.checkout_path(v.blob_digest)
        if self._intact_checkout(checkout, v.blob_digest, label):
            return checkout
        try:
            return self.blobs.materialise(v.blob_digest, checkout, label=label)
        except DestinationNotEmptyError:
            # Between our look and our extraction another process (a second rewriter on the same blob
            # directory) renamed its own checkout into place: verify and use that one.
            if self._intact_checkout(checkout, v.blob_digest, label):
                return checkout
            return self.blobs.materialise(v.blob_digest, checkout, label=label)

    @staticmethod
    def _intact_checkout(checkout: Path, digest: str, label: str) -> bool:
        """Whether ``checkout`` exists and hashes to ``digest``; a modified one is removed."""
        if not checkout.is_dir():
            return False
        if digest_dir(checkout) == digest:
            return True
        log.warning("checkout %s of %s was modified; extracting it again", checkout, label)
        shutil.rmtree(checkout, ignore_errors=True)
        return False

    def verify(self, version: VersionRef) -> None:
        """Re-hash the version's blob; raise ``BlobMissingError`` / ``BlobIntegrityError`` if it is bad."""
        v = self.get(version) if not isinstance(version, PolicyVersion) else version
        self.blobs.verify(v.blob_digest, label=f"version {v.id}")

    def rollback_targets(self) -> dict[str, int | None]:
        """Alias → the ready version ``rollback(alias)`` would return to now (None: nothing to go back to)."""
        with self._reading() as session:
            ready = set(
                session.scalars(sa.select(SqlPolicyVersion.id).where(SqlPolicyVersion.status == "ready"))
            )
            targets: dict[str, int | None] = {}
            for row in session.scalars(sa.select(SqlPolicyAlias)):
                earlier = [v for v in self._holder_stack(session, row.alias) if v != row.version_id]
                candidates = [v for v in earlier if v in ready]
                targets[row.alias] = candidates[-1] if candidates else None
            return targets

    def apply_retention(
        self,
        rule: RetentionRule,
        *,
        blob_grace: timedelta = timedelta(hours=1),
        now: datetime | None = None,
        actor: str = "retention",
        dry_run: bool = False,
    ) -> RetentionReport:
        """Archive every version the retention rule does not keep (``policy_store.retention``), then free
        the blobs and checkouts only archived versions reference (older than ``blob_grace``).

        Each archive is its own transaction and refuses a version an alias holds, so an alias moved onto a
        planned version meanwhile wins (the version is reported as skipped); gc runs under the publish lock.
        """
        plan = plan_retention(
            self.list(),
            {alias: record.version_id for alias, record in self.aliases().items()},
            self.rollback_targets(),
            now or utcnow(),
            rule,
        )
        archived: builtins.list[int] = []
        skipped: builtins.list[int] = []
        reason = f"retention: keep last {rule.keep_last}, younger than {rule.keep_younger_than}"
        for vid in [] if dry_run else plan.archive:
            try:
                self.archive(vid, reason=reason, actor=actor)
                archived.append(vid)
            except VersionInUseError:
                skipped.append(vid)
        report = self.gc(blob_grace, actor=actor, dry_run=dry_run, free_archived=True)
        log.info(
            "retention: %d versions kept, %d archived, %d skipped, %d bytes freed",
            len(plan.keep),
            len(archived),
            len(skipped),
            report.freed_bytes,
        )
        return RetentionReport(plan, archived, skipped, report)

    def gc(
        self,
        retention: timedelta = timedelta(hours=24),
        *,
        actor: str = "gc",
        dry_run: bool = False,
        free_archived: bool = False,
    ) -> GcReport:
        """Delete blob files (and their checkouts, and temp leftovers) that no version row references and
        that are older than ``retention``. Referenced blobs are always kept, whatever their age.
        ``free_archived``: a blob referenced only by archived versions counts as unreferenced (retention).

        Runs under the publish lock, so a publish either committed before (its blob is referenced) or
        re-checks its blob after (and rewrites it). ``retention`` additionally spares blobs still being
        written by a publish that has not reached its transaction yet.
        """
        cutoff = retention.total_seconds()
        with self._writing(exclusive=True) as session:
            query = sa.select(SqlPolicyVersion.blob_digest).distinct()
            if free_archived:
                query = query.where(SqlPolicyVersion.status != "archived")
            referenced = set(session.scalars(query))

            def stale(path: Path) -> bool:
                return self.blobs.age_seconds(path) >= cutoff

            blobs = [(d, p) for d, p in self.blobs.iter_blobs() if d not in referenced and stale(p)]
            checkouts = [(d, p) for d, p in self.blobs.iter_checkouts() if d not in referenced and stale(p)]
            temp = [p for p in self.blobs.iter_temp() if stale(p)]
            freed = sum(self.blobs.size_of(p) for _, p in blobs)
            report = GcReport(
                removed_blobs=[d for d, _ in blobs],
                removed_checkouts=[d for d, _ in checkouts],
                removed_temp=[p.name for p in temp],
                freed_bytes=freed,
                kept_blobs=sum(1 for d, _ in self.blobs.iter_blobs() if d in referenced),
                dry_run=dry_run,
            )
            if dry_run or not (blobs or checkouts or temp):
                return report
            for path in [p for _, p in blobs] + [p for _, p in checkouts] + temp:
                self.blobs.remove(path)
            self._audit(
                session,
                "gc",
                actor=actor,
                reason=f"retention {retention}",
                details={
                    "removed_blobs": report.removed_blobs,
                    "removed_checkouts": report.removed_checkouts,
                    "removed_temp": report.removed_temp,
                    "freed_bytes": freed,
                },
            )
            return report

    # ---------------------------------------------------------------------------------------------- helpers

    def _version_row(self, session: Session, vid: int, *, lock: LockMode = None) -> SqlPolicyVersion:
        # On SQLite FOR UPDATE/SHARE render as nothing: the BEGIN IMMEDIATE write lock already covers it.
        for_update = {"read": True} if lock == "share" else (lock == "update" or None)
        row = session.get(SqlPolicyVersion, vid, with_for_update=for_update)
        if row is None:
            raise UnknownVersionError(f"unknown version {vid}")
        return row

    def _ready_version(self, session: Session, vid: int, *, force: bool) -> SqlPolicyVersion:
        # Share lock: a concurrent reject() waits for this transaction, or this one sees the rejection.
        row = self._version_row(session, vid, lock="share")
        if row.status != "ready" and not force:
            raise VersionNotReadyError(
                f"version {vid} is {row.status}; an alias may only point at a ready one"
            )
        return row

    def _find_alias_row(self, session: Session, alias: str, *, lock: bool = False) -> SqlPolicyAlias | None:
        query = sa.select(SqlPolicyAlias).where(SqlPolicyAlias.alias == alias)
        if lock:
            # populate_existing: under the lock, re-read the row even if this session already holds it.
            query = query.with_for_update().execution_options(populate_existing=True)
        return session.scalars(query).one_or_none()

    def _alias_row(self, session: Session, alias: str, *, lock: bool = False) -> SqlPolicyAlias:
        row = self._find_alias_row(session, alias, lock=lock)
        if row is None:
            raise UnknownAliasError(f"unknown alias {alias!r}")
        return row

    def _audit(
        self,
        session: Session,
        action: AuditAction,
        *,
        actor: str,
        reason: str = "",
        alias: str | None = None,
        from_version: int | None = None,
        to_version: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> AuditEntry:
        row = SqlAuditEntry(
            at=utcnow(),
            action=action,
            actor=actor,
            reason=reason,
            alias=alias,
            from_version=from_version,
            to_version=to_version,
            details=details or {},
        )
        session.add(row)
        session.flush()
        return row.to_entity()
