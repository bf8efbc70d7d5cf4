"""SQLAlchemy rows of the policy store (``migrations/versions/0001_policy_store.py`` mirrors them).

Three tables, in the manner of MLflow's model registry, and a fourth for leases (``lease.py``):

- ``policy_versions``: one immutable row per published policy. Only ``status`` ever changes.
- ``policy_aliases``: a tiny ``alias → version`` row, so promotion and rollback are one-row updates.
- ``audit_log``: append-only; every state change writes one row in the same transaction as the change.
- ``leases``: one row per named role (a learner lineage) with its holder and fencing epoch.

Rows convert to the plain entities of ``entities.py`` with ``to_entity()``; nothing outside this package
should hold a row.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from policy_store.entities import (
    AliasRecord,
    AuditAction,
    AuditEntry,
    PolicyVersion,
    VersionKind,
    VersionStatus,
)

# Explicit constraint names: SQLite batch migrations and downgrades can only drop what has a name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones and returns naive values, so UTC is written
    and the zone is put back on read. Naive input is refused rather than guessed.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the policy store only stores UTC-aware timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact); SQLite's JSON is text.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class SqlPolicyVersion(Base):
    __tablename__ = "policy_versions"
    __table_args__ = (
        sa.CheckConstraint("kind IN ('full', 'lora')", name="kind"),
        sa.CheckConstraint("status IN ('ready', 'rejected', 'archived')", name="status"),
        sa.CheckConstraint("train_steps >= 0", name="train_steps"),
        sa.CheckConstraint("size_bytes >= 0", name="size_bytes"),
        sa.Index("ix_policy_versions_status_id", "status", "id"),
        # AUTOINCREMENT: SQLite never hands out an id again, even the largest one after a rollback/delete,
        # so ids are monotonic on both backends (PostgreSQL: a sequence).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    base_model: Mapped[str] = mapped_column(sa.String(512))
    train_steps: Mapped[int] = mapped_column(sa.Integer, default=0)
    blob_digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    blob_uri: Mapped[str] = mapped_column(sa.String(512))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    kind: Mapped[str] = mapped_column(sa.String(16))
    offsets: Mapped[dict[str, int]] = mapped_column(JSONType, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    tags: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(sa.String(16), default="ready")

    def to_entity(self) -> PolicyVersion:
        return PolicyVersion(
            id=self.id,
            parent_id=self.parent_id,
            created_at=self.created_at,
            base_model=self.base_model,
            train_steps=self.train_steps,
            blob_digest=self.blob_digest,
            blob_uri=self.blob_uri,
            size_bytes=self.size_bytes,
            kind=cast(VersionKind, self.kind),
            status=cast(VersionStatus, self.status),
            offsets=dict(self.offsets or {}),
            metrics=dict(self.metrics or {}),
            tags=dict(self.tags or {}),
        )


class SqlPolicyAlias(Base):
    __tablename__ = "policy_aliases"

    alias: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Bumped on every move under the row lock: how many times the alias moved (`qrloop policy aliases`).
    generation: Mapped[int] = mapped_column(sa.Integer, default=1)
    # An operator's pin: while pinned_by is set, every move of the alias is refused (learner, canary, CLI).
    pinned_by: Mapped[str | None] = mapped_column(sa.String(128))
    pinned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pin_reason: Mapped[str | None] = mapped_column(sa.Text)

    def to_entity(self) -> AliasRecord:
        return AliasRecord(
            alias=self.alias,
            version_id=self.version_id,
            updated_at=self.updated_at,
            generation=self.generation,
            pinned_by=self.pinned_by,
            pinned_at=self.pinned_at,
            pin_reason=self.pin_reason or "",
        )


class SqlAuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (
        sa.CheckConstraint(
            "action IN ('publish', 'set_alias', 'rollback', 'reject', 'archive', 'gc', 'canary_verdict', "
            "'pin', 'unpin')",
            name="action",
        ),
        # history(alias) and the rollback replay read one alias's rows in id order.
        sa.Index("ix_audit_log_alias_id", "alias", "id"),
        sa.Index("ix_audit_log_action_id", "action", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(sa.String(32))
    actor: Mapped[str] = mapped_column(sa.String(128))
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    # No foreign key to policy_aliases: the log outlives whatever it describes and is never rewritten.
    alias: Mapped[str | None] = mapped_column(sa.String(128))
    from_version: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"))
    to_version: Mapped[int | None] = mapped_column(sa.ForeignKey("policy_versions.id"))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    def to_entity(self) -> AuditEntry:
        return AuditEntry(
            id=self.id,
            at=self.at,
            action=cast(AuditAction, self.action),
            actor=self.actor,
            reason=self.reason,
            alias=self.alias,
            from_version=self.from_version,
            to_version=self.to_version,
            details=dict(self.details or {}),
        )


class SqlLease(Base):
    """Who holds the lease called ``name`` until when; ``epoch`` grows by one with every change of holder."""

    __tablename__ = "leases"
    __table_args__ = (sa.CheckConstraint("epoch >= 0", name="epoch"),)

    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    holder: Mapped[str | None] = mapped_column(sa.String(256))  # None: released
    epoch: Mapped[int] = mapped_column(sa.Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
