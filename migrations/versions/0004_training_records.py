"""Learner training records: one row per pair per DPO step (step → pair ids), replacing the trained-pair set.

The old ``learner_trained_pairs`` had the pair id as its primary key: a pair trained twice could not be
recorded, only fail the publish (and every restart after it). Training records have no unique key on the
pair, so a duplicate is countable; the learner prevents duplicates by checking each batch against them.
Existing rows are carried over, each as its version's step of its version's learner lineage.

Revision ID: 0004_training_records
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_training_records"
down_revision: str | None = "0003_alias_outbox_pins"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "learner_training_records"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("learner", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["policy_versions.id"],
            name=op.f("fk_learner_training_records_version_id_policy_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_learner_training_records")),
    )
    op.create_index(op.f("ix_learner_training_records_version_id"), TABLE, ["version_id"])
    op.create_index("ix_learner_training_records_learner_pair", TABLE, ["learner", "pair_id"])
    # Copied inside the database (no round trip of timestamps through Python), one statement per version:
    # the learner's name is in the version's JSON tags, read here because JSON paths differ by dialect.
    bind = op.get_bind()
    versions = bind.execute(
        sa.text(
            "select distinct v.id, v.tags from policy_versions v "
            "join learner_trained_pairs p on p.version_id = v.id"
        )
    ).all()
    for version_id, tags in versions:
        tags = json.loads(tags) if isinstance(tags, str) else (tags or {})
        bind.execute(
            sa.text(
                f"insert into {TABLE} (learner, step, pair_id, version_id, trained_at) "
                "select :learner, v.train_steps, p.pair_id, p.version_id, p.trained_at "
                "from learner_trained_pairs p join policy_versions v on v.id = p.version_id "
                "where p.version_id = :version_id"
            ),
            {"learner": str(tags.get("learner", "")), "version_id": version_id},
        )
    op.drop_index(op.f("ix_learner_trained_pairs_version_id"), table_name="learner_trained_pairs")
    op.drop_table("learner_trained_pairs")


def downgrade() -> None:
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
    # The first training of each pair (a duplicate cannot be represented in the old table).
    op.get_bind().execute(
        sa.text(
            "insert into learner_trained_pairs (pair_id, version_id, trained_at) "
            f"select pair_id, min(version_id), min(trained_at) from {TABLE} group by pair_id"
        )
    )
    op.drop_index("ix_learner_training_records_learner_pair", table_name=TABLE)
    op.drop_index(op.f("ix_learner_training_records_version_id"), table_name=TABLE)
    op.drop_table(TABLE)
