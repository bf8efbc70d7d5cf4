"""Which versions keep their weights: the retention rule, a pure function of plain values.

A version is one ~540 MB blob (plus a checkout of the same size once loaded); a learner publishing every few
minutes fills a disk in days. The rule keeps what someone may still load and archives the rest, whose blobs
``PolicyStore.gc(free_archived=True)`` then frees. Rows are never deleted: an archived version keeps its
metadata, lineage and audit trail, only its weights go.

Kept, each for a reason that is reported:

- ``alias:<name>``   a version an alias points at (``production``, ``canary``, a pinned alias...);
- ``rollback:<name>`` the version ``rollback`` of that alias would return to (its previous holder), so a
  roll back never meets freed weights;
- ``reference``      the DPO reference model of a kept version (``tags["reference_version"]``) and the root
  of its lineage: a learner resuming from a kept version needs both. The intermediate ancestors are *not*
  kept: in a linear online run every version is an ancestor of production, so keeping them all would keep
  everything; their rows (the lineage) stay;
- ``base``           the version a kept LoRA adapter applies to (``tags["base_version"]``): without it the
  adapter cannot be served;
- ``learner:<name>`` the newest version of each learner lineage (``tags["learner"]``): where it resumes;
- ``last``           the newest ``keep_last`` versions;
- ``young``          versions younger than ``keep_younger_than``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from policy_store.entities import ADAPTER_BASE_TAG, PolicyVersion, version_tag


@dataclass(frozen=True)
class RetentionRule:
    keep_last: int = 5
    keep_younger_than: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(
                f"keep_last must be >= 1 (the newest version is always kept), not {self.keep_last}"
            )
        if self.keep_younger_than < timedelta(0):
            raise ValueError("keep_younger_than must not be negative")


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[int, list[str]] = field(default_factory=dict)  # version id -> why it is kept
    # Versions whose weights may go, in the order to archive them: adapters first (a base is not archived
    # while an adapter over it is not, and a base is only dropped with its adapters), oldest first in each.
    archive: list[int] = field(default_factory=list)


def _lineage_root(version_id: int, parents: Mapping[int, int | None]) -> int:
    seen: set[int] = set()
    current = version_id
    while (parent := parents.get(current)) is not None and parent not in seen:
        seen.add(current)
        current = parent
    return current


def plan_retention(
    versions: Sequence[PolicyVersion],
    aliases: Mapping[str, int],
    previous_holders: Mapping[str, int | None],
    now: datetime,
    rule: RetentionRule,
) -> RetentionPlan:
    """Which of ``versions`` keep their weights and which are archived (already archived ones: neither).

    ``aliases``: alias → the version it holds; ``previous_holders``: alias → the version its rollback would
    return to (None: none); ``now``: timezone-aware, like ``created_at``.
    """
    keep: dict[int, list[str]] = {}

    def mark(ids: Iterable[int | None], reason: str) -> None:
        for vid in ids:
            if vid is not None:
                keep.setdefault(vid, []).append(reason)

    by_id = {v.id: v for v in versions}
    for alias, held in sorted(aliases.items()):
        mark([held], f"alias:{alias}")
    for alias, previous in sorted(previous_holders.items()):
        mark([previous], f"rollback:{alias}")
    newest_first = sorted(versions, key=lambda v: v.id, reverse=True)
    mark((v.id for v in newest_first[: rule.keep_last]), "last")
    mark((v.id for v in versions if now - v.created_at < rule.keep_younger_than), "young")
    learners: dict[str, int] = {}
    for v in newest_first:
        name = v.tags.get("learner")
        if isinstance(name, str):
            learners.setdefault(name, v.id)
    for name, vid in sorted(learners.items()):
        mark([vid], f"learner:{name}")
    # References last: they are needed by whatever the rules above kept.
    parents = {v.id: v.parent_id for v in versions}
    for vid in sorted(keep):
        kept = by_id.get(vid)
        if kept is None:
            continue
        mark([version_tag(kept.tags, "reference_version"), _lineage_root(vid, parents)], "reference")
        if kept.kind == "lora":
            mark([version_tag(kept.tags, ADAPTER_BASE_TAG)], "base")
    archive = [
        v.id
        for v in sorted(versions, key=lambda v: (v.kind != "lora", v.id))
        if v.id not in keep and v.status != "archived"
    ]
    return RetentionPlan({vid: sorted(set(reasons)) for vid, reasons in keep.items()}, archive)
