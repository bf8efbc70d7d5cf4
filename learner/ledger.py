"""The learner's ledger: which preference pairs each published version was trained on.

Rows are written by ``PolicyStore.publish(..., extra_sql=...)`` in the *same* transaction as the version
and its consumed Kafka offsets, so after any crash the database says exactly which pairs are in the weights:
none twice (the primary key), none lost (the offsets say where to resume).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, Session, mapped_column

from policy_store.models import Base, UTCDateTime, utcnow


class SqlTrainedPair(Base):
    __tablename__ = "learner_trained_pairs"

    pair_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(sa.ForeignKey("policy_versions.id"), index=True)
    trained_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def record_pairs(session: Session, version_id: int, pair_ids: Iterable[str]) -> None:
    session.add_all(SqlTrainedPair(pair_id=pid, version_id=version_id) for pid in pair_ids)


def trained_pair_ids(session: Session) -> set[str]:
    return set(session.scalars(sa.select(SqlTrainedPair.pair_id)))


def pairs_of_version(session: Session, version_id: int) -> set[str]:
    return set(
        session.scalars(sa.select(SqlTrainedPair.pair_id).where(SqlTrainedPair.version_id == version_id))
    )
