"""Learner ledger: the preference pairs each version was trained on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "learner_trained_pairs",
        sa.Column("pair_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["policy_versions.id"],
            name=op.f("fk_learner_trained_pairs_version_id_policy_versions"),
        ),
        sa.PrimaryKeyConstraint("pair_id", name=op.f("pk_learner_trained_pairs")),
    )
    op.create_index(op.f("ix_learner_trained_pairs_version_id"), "learner_trained_pairs", ["version_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_learner_trained_pairs_version_id"), table_name="learner_trained_pairs")
    op.drop_table("learner_trained_pairs")
