"""Alias pins: an operator's pin on an alias, and the audit actions 'pin' / 'unpin'.

Revision ID: 0003_alias_outbox_pins
Revises: 0002
Create Date: 2026-12-01

Delivery of alias moves needs no table: the policy store is the authority and the rewriter reconciles with it
every ``rewriter.reconcile_s`` (announcements only make it react sooner), so a move committed just before a
crash is still served. This revision adds the pin columns to ``policy_aliases`` and widens the audit log's
action check. SQLite cannot alter a CHECK constraint, so there ``audit_log`` is rebuilt (batch mode) from the
frozen definition below, which keeps its AUTOINCREMENT and indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003_alias_outbox_pins"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
UTC_TIMESTAMP = sa.DateTime(timezone=True)
ACTIONS_0001 = "'publish', 'set_alias', 'rollback', 'reject', 'archive', 'gc', 'canary_verdict'"
ACTIONS_0003 = ACTIONS_0001 + ", 'pin', 'unpin'"


def _audit_log(actions: str) -> sa.Table:
    """``audit_log`` as 0001 created it, with the given action check (SQLite's batch rebuild copies it)."""
    return sa.Table(
        "audit_log",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=True),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.CheckConstraint(f"action IN ({actions})", name=op.f("ck_audit_log_action")),
        sa.ForeignKeyConstraint(
            ["from_version"], ["policy_versions.id"], name=op.f("fk_audit_log_from_version_policy_versions")
        ),
        sa.ForeignKeyConstraint(
            ["to_version"], ["policy_versions.id"], name=op.f("fk_audit_log_to_version_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sa.Index(op.f("ix_audit_log_alias_id"), "alias", "id"),
        sa.Index(op.f("ix_audit_log_action_id"), "action", "id"),
        sqlite_autoincrement=True,
    )


def _set_actions(actions: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("audit_log", copy_from=_audit_log(actions), recreate="always"):
            pass
        return
    op.drop_constraint(op.f("ck_audit_log_action"), "audit_log", type_="check")
    op.create_check_constraint(op.f("ck_audit_log_action"), "audit_log", f"action IN ({actions})")


def upgrade() -> None:
    op.add_column("policy_aliases", sa.Column("pinned_by", sa.String(length=128), nullable=True))
    op.add_column("policy_aliases", sa.Column("pinned_at", UTC_TIMESTAMP, nullable=True))
    op.add_column("policy_aliases", sa.Column("pin_reason", sa.Text(), nullable=True))
    _set_actions(ACTIONS_0003)


def downgrade() -> None:
    op.execute("DELETE FROM audit_log WHERE action IN ('pin', 'unpin')")
    _set_actions(ACTIONS_0001)
    with op.batch_alter_table("policy_aliases") as batch:
        batch.drop_column("pin_reason")
        batch.drop_column("pinned_at")
        batch.drop_column("pinned_by")
