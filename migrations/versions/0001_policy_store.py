"""Policy store: versions, aliases, audit log.

Revision ID: 0001
Revises:
Create Date: 2025-11-23

Written by hand, not imported from ``policy_store.models``: a migration is a frozen snapshot and must keep
producing this schema whatever the models become later. Names follow the models' naming convention
(``op.f`` marks them as final) so that autogenerate finds no difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
UTC_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("base_model", sa.String(length=512), nullable=False),
        sa.Column("train_steps", sa.Integer(), nullable=False),
        sa.Column("blob_digest", sa.String(length=64), nullable=False),
        sa.Column("blob_uri", sa.String(length=512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("offsets", JSON, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.CheckConstraint("kind IN ('full', 'lora')", name=op.f("ck_policy_versions_kind")),
        sa.CheckConstraint(
            "status IN ('ready', 'rejected', 'archived')", name=op.f("ck_policy_versions_status")
        ),
        sa.CheckConstraint("train_steps >= 0", name=op.f("ck_policy_versions_train_steps")),
        sa.CheckConstraint("size_bytes >= 0", name=op.f("ck_policy_versions_size_bytes")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["policy_versions.id"], name=op.f("fk_policy_versions_parent_id_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_policy_versions_parent_id"), "policy_versions", ["parent_id"])
    op.create_index(op.f("ix_policy_versions_blob_digest"), "policy_versions", ["blob_digest"])
    op.create_index(op.f("ix_policy_versions_status_id"), "policy_versions", ["status", "id"])

    op.create_table(
        "policy_aliases",
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"], ["policy_versions.id"], name=op.f("fk_policy_aliases_version_id_policy_versions")
        ),
        sa.PrimaryKeyConstraint("alias", name=op.f("pk_policy_aliases")),
    )
    op.create_index(op.f("ix_policy_aliases_version_id"), "policy_aliases", ["version_id"])

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", UTC_TIMESTAMP, nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=True),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.CheckConstraint(
            "action IN ('publish', 'set_alias', 'rollback', 'reject', 'archive', 'gc', 'canary_verdict')",
            name=op.f("ck_audit_log_action"),
        ),
        sa.ForeignKeyConstraint(
            ["from_version"], ["policy_versions.id"], name=op.f("fk_audit_log_from_version_policy_versions")
        ),
        sa.ForeignKeyConstraint(
            ["to_version"], ["policy_versions.id"], name=op.f("fk_audit_log_to_version_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_audit_log_alias_id"), "audit_log", ["alias", "id"])
    op.create_index(op.f("ix_audit_log_action_id"), "audit_log", ["action", "id"])


def downgrade() -> None:
    # Reverse dependency order: both other tables reference policy_versions.
    op.drop_index(op.f("ix_audit_log_action_id"), table_name="audit_log")
    op.drop_index(op.f("ix_audit_log_alias_id"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index(op.f("ix_policy_aliases_version_id"), table_name="policy_aliases")
    op.drop_table("policy_aliases")
    op.drop_index(op.f("ix_policy_versions_status_id"), table_name="policy_versions")
    op.drop_index(op.f("ix_policy_versions_blob_digest"), table_name="policy_versions")
    op.drop_index(op.f("ix_policy_versions_parent_id"), table_name="policy_versions")
    op.drop_table("policy_versions")
