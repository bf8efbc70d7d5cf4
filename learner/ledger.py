"""The learner's ledger: training records, one row per pair per DPO step (step → pair ids).

Rows are written by ``PolicyStore.publish(..., extra_sql=...)`` in the *same* transaction as the version
and its consumed Kafka offsets, so after any crash the database says exactly which pairs are in the weights.
Nothing makes a second row for a pair impossible (no unique key on it): the learner checks each batch's ids
against this table before a step (:func:`already_trained`, one indexed query), and a test that counts rows
per pair can therefore see a pair trained twice instead of a constraint hiding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, Session, mapped_column

from policy_store.models import Base, UTCDateTime, utcnow

# (lineage step number, the pair ids of that step's batch)
StepRecord = tuple[int, Sequence[str]]


class SqlTrainingRecord(Base):
    __tablename__ = "learner_training_records"
    __table_args__ = (sa.Index("ix_learner_training_records_learner_pair", "learner", "pair_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    learner: Mapped[str] = mapped_column(sa.String(128))
    step: Mapped[int] = mapped_column(sa.Integer)
    pair_id: Mapped[str] = mapped_column(sa.String(64))
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    trained_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def record_steps(session: Session, version_id: int, learner: str, steps: Iterable[StepRecord]) -> None:
    """The steps a publish includes (several when ``dpo.publish_every`` > 1), one row per pair."""
    session.add_all(
        SqlTrainingRecord(learner=learner, step=step, pair_id=pid, version_id=version_id)
        for step, pair_ids in steps
        for pid in pair_ids
    )


def already_trained(session: Session, learner: str, pair_ids: Iterable[str]) -> set[str]:
    """Which of ``pair_ids`` this learner's lineage has trained on: one query on (learner, pair_id)."""
    ids = sorted(set(pair_ids))
    if not ids:
        return set()
    query = sa.select(SqlTrainingRecord.pair_id).where(
        SqlTrainingRecord.learner == learner, SqlTrainingRecord.pair_id.in_(ids)
    )
    return set(session.scalars(query.distinct()))


def training_counts(session: Session, learner: str) -> dict[str, int]:
    """How many steps trained each pair (1 everywhere when training is exactly-once)."""
    rows = session.execute(
        sa.select(SqlTrainingRecord.pair_id, sa.func.count())
        .where(SqlTrainingRecord.learner == learner)
        .group_by(SqlTrainingRecord.pair_id)
    ).all()
    return {pid: int(n) for pid, n in rows}


def steps_of(session: Session, learner: str) -> dict[int, list[str]]:
    """Step number → its pair ids, for this learner's lineage (a rebase starts the numbers again)."""
    rows = session.execute(
        sa.select(SqlTrainingRecord.step, SqlTrainingRecord.pair_id)
        .where(SqlTrainingRecord.learner == learner)
        .order_by(SqlTrainingRecord.id)
    ).all()
    steps: dict[int, list[str]] = {}
    for step, pid in rows:
        steps.setdefault(int(step), []).append(pid)
    return steps


def pairs_of_version(session: Session, version_id: int) -> set[str]:
    return set(
        session.scalars(
            sa.select(SqlTrainingRecord.pair_id).where(SqlTrainingRecord.version_id == version_id)
        )
    )
