"""Plain, immutable values callers receive from the store.

They are deliberately not the SQLAlchemy rows (see ``models.py``): a row is tied to a session and to the
database's shape, an entity is safe to keep, pass between threads and compare. The JSON-valued fields are
plain dicts; treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

VersionKind = Literal["full", "lora"]
VersionStatus = Literal["ready", "rejected", "archived"]
AuditAction = Literal[
    "publish", "set_alias", "rollback", "reject", "archive", "gc", "canary_verdict", "pin", "unpin"
]

KINDS: tuple[VersionKind, ...] = ("full", "lora")
# A ``lora`` version is an adapter, meaningless without the ``full`` version it was trained over: this tag
# names that version. The store checks it at publish, and retention keeps the base of every kept adapter.
ADAPTER_BASE_TAG = "base_version"


def version_tag(tags: Mapping[str, Any], name: str) -> int | None:
    """The version id the tag ``name`` holds (``base_version``, ``reference_version``), or None when it holds
    none: absent, or not a whole number (JSON gives ints back; a caller may have written a string)."""
    value = tags.get(name)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        return None
    return int(value)


STATUSES: tuple[VersionStatus, ...] = ("ready", "rejected", "archived")
AUDIT_ACTIONS: tuple[AuditAction, ...] = (
    "publish",
    "set_alias",
    "rollback",
    "reject",
    "archive",
    "gc",
    "canary_verdict",
    "pin",
    "unpin",
)


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One immutable published policy: where its weights are and what produced them."""

    id: int
    parent_id: int | None
    created_at: datetime
    base_model: str
    train_steps: int
    blob_digest: str
    blob_uri: str
    size_bytes: int
    kind: VersionKind
    status: VersionStatus
    offsets: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AliasRecord:
    """``alias → version``; ``generation`` counts the moves, so a watcher can tell that something moved.
    ``pinned_by``: who pinned it (None: not pinned); a pinned alias refuses every move until unpinned."""

    alias: str
    version_id: int
    updated_at: datetime
    generation: int
    pinned_by: str | None = None
    pinned_at: datetime | None = None
    pin_reason: str = ""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One append-only audit row. For alias moves ``from_version → to_version``; for a status change or a
    canary verdict ``to_version`` is the version concerned."""

    id: int
    at: datetime
    action: AuditAction
    actor: str
    reason: str
    alias: str | None
    from_version: int | None
    to_version: int | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GcReport:
    """What ``PolicyStore.gc`` removed (``dry_run`` reports what it would remove)."""

    removed_blobs: list[str]
    removed_checkouts: list[str]
    removed_temp: list[str]
    freed_bytes: int
    kept_blobs: int
    dry_run: bool = False
