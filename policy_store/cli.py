"""``qrloop policy ...``: inspect versions and move aliases by hand.

The store comes from whoever mounts the commands: :func:`build_app` takes a factory that opens it (the
``qrloop`` root opens the one its settings name, schema brought up to date first), so this package reads no
application settings. Refusals (unknown version/alias, nothing to roll back to, ...) print one red line and
exit with status 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from policy_store.entities import AuditEntry, PolicyVersion
from policy_store.errors import PolicyStoreError
from policy_store.retention import RetentionRule
from policy_store.store import PolicyStore, RetentionReport

StoreFactory = Callable[[], PolicyStore]
RetentionDefaults = Callable[[], tuple[RetentionRule, timedelta]]


def _built_in_retention() -> tuple[RetentionRule, timedelta]:
    return RetentionRule(), timedelta(hours=24)


@dataclass(frozen=True)
class StoreAccess:
    """What the mounting application hands the commands: how to open its store, and its retention defaults
    (called only by ``gc --retention``, so reading them cannot fail any other command)."""

    open_store: StoreFactory
    retention_defaults: RetentionDefaults = _built_in_retention  # (rule, grace of unreferenced blobs)


EXIT_REFUSED = 2


def _stdout() -> Console:
    # Built per command, not at import: CliRunner (and redirections) swap sys.stdout after import.
    return Console()


def build_app(open_store: StoreFactory, retention_defaults: RetentionDefaults | None = None) -> typer.Typer:
    """The ``policy`` commands over the store ``open_store()`` returns (called once per command)."""
    access = StoreAccess(open_store, retention_defaults or _built_in_retention)
    app = typer.Typer(
        help="Policy versions, aliases and their audit log.",
        no_args_is_help=True,
        context_settings={"obj": access},  # each command's ctx.obj
    )
    for name, command in COMMANDS.items():
        app.command(name)(command)
    return app


@contextmanager
def _store(ctx: typer.Context) -> Iterator[PolicyStore]:
    access: StoreAccess = ctx.obj
    try:
        with access.open_store() as store:
            yield store
    except PolicyStoreError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None


def _resolve_ref(store: PolicyStore, ref: str) -> PolicyVersion:
    """A version given as an id (``7``) or as an alias name (``production``)."""
    return store.get(int(ref)) if ref.isdigit() else store.resolve(ref)


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S")


def _short_time(at: datetime) -> str:
    # Tables must fit 80 columns; the year is in --json and `policy show`.
    return at.strftime("%m-%d %H:%M:%S")


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


def _table(title: str, *columns: str, **options: Any) -> Table:
    """A table readable at 80 columns and in a pipe: light borders, cells cut with an ellipsis, not wrapped
    onto a second line, except the last column (free text such as a reason), which folds."""
    # Columns two spaces apart, no outer edge: more room for the cells at 80 columns.
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), **options)
    for n, column in enumerate(columns):
        last = n == len(columns) - 1
        table.add_column(column, no_wrap=not last, overflow="fold" if last else "ellipsis")
    return table


def _print_json(data: object) -> None:
    # Plain print, not rich: a pipe gets the JSON text unwrapped and without colour codes.
    print(json.dumps(data, default=str, indent=2))


def _version_json(v: PolicyVersion, aliases: list[str]) -> dict[str, Any]:
    return {**asdict(v), "aliases": sorted(aliases)}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _held_by(store: PolicyStore) -> dict[int, list[str]]:
    held: dict[int, list[str]] = {}
    for record in store.aliases().values():
        held.setdefault(record.version_id, []).append(record.alias)
    return held


def _audit_table(title: str, entries: list[AuditEntry]) -> Table:
    # One alias's history: no alias column, so the reason keeps room at 80 columns.
    table = _table(title, "#", "at (UTC)", "action", "from", "to", "actor", "reason")
    for e in entries:
        table.add_row(
            str(e.id),
            _short_time(e.at),
            e.action,
            "" if e.from_version is None else str(e.from_version),
            "" if e.to_version is None else str(e.to_version),
            e.actor,
            e.reason,
        )
    return table


def list_versions(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only versions with this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Versions, newest first, with the aliases that hold them."""
    with _store(ctx) as store:
        versions = store.list(status=status, limit=limit)
        held = _held_by(store)
    if as_json:
        _print_json([_version_json(v, held.get(v.id, [])) for v in versions])
        return
    # Kind and size are left to `policy show` and --json: nine columns do not fit 80.
    table = _table("policy versions", "id", "parent", "created", "status", "steps", "digest", "aliases")
    for v in versions:
        table.add_row(
            str(v.id),
            "" if v.parent_id is None else str(v.parent_id),
            _short_time(v.created_at),
            v.status,
            str(v.train_steps),
            v.blob_digest[:7],
            ",".join(held.get(v.id, [])),
        )
    _stdout().print(table)


def show(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Version id or alias.")],
    as_json: JsonFlag = False,
) -> None:
    """Everything recorded about one version."""
    with _store(ctx) as store:
        v = _resolve_ref(store, version)
        lineage = [p.id for p in store.lineage(v)]
        held = _held_by(store).get(v.id, [])
    if as_json:
        _print_json({**_version_json(v, held), "lineage": lineage})
        return
    table = Table(title=f"policy version {v.id}", show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows = {
        "id": str(v.id),
        "lineage": " ← ".join(map(str, lineage)),
        "created (UTC)": _time(v.created_at),
        "status": v.status,
        "kind": v.kind,
        "base model": v.base_model,
        "train steps": str(v.train_steps),
        "aliases": ", ".join(held),
        "blob": f"sha256:{v.blob_digest}",
        "blob uri": v.blob_uri,
        "size": _size(v.size_bytes),
        "offsets": json.dumps(v.offsets, sort_keys=True),
        "metrics": json.dumps(v.metrics, sort_keys=True),
        "tags": json.dumps(v.tags, sort_keys=True),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    _stdout().print(table)


def aliases(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every alias, the version it points at, and its pin."""
    with _store(ctx) as store:
        records = store.aliases()
    if as_json:
        _print_json([asdict(r) for r in records.values()])
        return
    table = _table("aliases", "alias", "version", "updated (UTC)", "moves", "pinned")
    for r in records.values():
        pinned = "" if r.pinned_by is None else f"by {r.pinned_by}"
        pinned += f": {r.pin_reason}" if r.pin_reason else ""
        table.add_row(r.alias, str(r.version_id), _short_time(r.updated_at), str(r.generation), pinned)
    _stdout().print(table)


def set_alias(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias to move (created if new).")],
    version: Annotated[str, typer.Argument(help="Version id (or another alias) to point it at.")],
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
) -> None:
    """Point an alias at a version."""
    with _store(ctx) as store:
        entry = store.set_alias(alias, _resolve_ref(store, version).id, reason=reason, actor="cli")
    _stdout().print(f"{alias}: {entry.from_version} → {entry.to_version}")


def rollback(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias to move back.")],
    to: Annotated[
        str | None, typer.Option(help="Version id to go back to (default: previous holder).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
    pin: Annotated[
        bool, typer.Option(help="Also pin the alias there: no learner or canary moves it until `unpin`.")
    ] = False,
) -> None:
    """Move an alias back to its previous holder (or to --to)."""
    with _store(ctx) as store:
        target = None if to is None else _resolve_ref(store, to).id
        entry = store.rollback(alias, to=target, reason=reason, actor="cli", pin=pin)
    pinned = ", pinned" if pin else ""
    _stdout().print(f"{alias}: {entry.from_version} → {entry.to_version} (rollback{pinned})")


def pin(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias to pin to the version it holds.")],
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
) -> None:
    """Pin an alias: every move (learner publish, canary verdict, set-alias, rollback) is refused."""
    with _store(ctx) as store:
        entry = store.pin(alias, reason=reason, actor="cli")
    _stdout().print(f"{alias}: pinned to {entry.to_version}")


def unpin(
    ctx: typer.Context,
    alias: Annotated[str, typer.Argument(help="Alias to unpin.")],
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
) -> None:
    """Remove an alias's pin: the learner and the canary may move it again."""
    with _store(ctx) as store:
        entry = store.unpin(alias, reason=reason, actor="cli")
    _stdout().print(f"{alias}: unpinned (holds {entry.to_version})")


def history(
    ctx: typer.Context, alias: Annotated[str, typer.Argument(help="Alias.")], as_json: JsonFlag = False
) -> None:
    """The audit rows about one alias, newest first."""
    with _store(ctx) as store:
        entries = store.history(alias)
    if as_json:
        _print_json([asdict(e) for e in entries])
        return
    _stdout().print(_audit_table(f"history of {alias}", entries))


def _retention_table(report: RetentionReport, dry_run: bool) -> Table:
    table = _table("retention (dry run)" if dry_run else "retention", "version", "verdict", "why")
    for vid, reasons in sorted(report.plan.keep.items()):
        table.add_row(str(vid), "kept", ", ".join(reasons))
    done = set(report.archived)
    for vid in report.plan.archive:
        verdict = "archived" if vid in done else ("to archive" if dry_run else "skipped (alias moved)")
        table.add_row(str(vid), verdict, "weights freed" if vid in done else "")
    return table


def gc(
    ctx: typer.Context,
    retention_hours: Annotated[
        float | None,
        typer.Option(
            help="Keep unreferenced blobs younger than this many hours [24; retention.blob_grace_h]."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Only report what would be removed.")] = False,
    retention: Annotated[
        bool,
        typer.Option(
            "--retention",
            help="First apply the retention policy: archive the versions it does not keep (aliased, their "
            "rollback targets and references, the last N, the young) and free their weights.",
        ),
    ] = False,
    keep_last: Annotated[int | None, typer.Option(help="With --retention [retention.keep_last].")] = None,
    keep_younger_than_hours: Annotated[
        float | None, typer.Option(help="With --retention [retention.keep_younger_than_h].")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove blobs no version references (and stale temp files); --retention: archive old versions first."""
    access: StoreAccess = ctx.obj
    with _store(ctx) as store:
        if retention:
            default_rule, default_grace = access.retention_defaults()
            rule = RetentionRule(
                keep_last=default_rule.keep_last if keep_last is None else keep_last,
                keep_younger_than=default_rule.keep_younger_than
                if keep_younger_than_hours is None
                else timedelta(hours=keep_younger_than_hours),
            )
            grace = default_grace if retention_hours is None else timedelta(hours=retention_hours)
            applied = store.apply_retention(rule, blob_grace=grace, actor="cli", dry_run=dry_run)
            if not as_json:
                _stdout().print(_retention_table(applied, dry_run))
            report = applied.gc
        else:
            grace = timedelta(hours=24.0 if retention_hours is None else retention_hours)
            report = store.gc(grace, actor="cli", dry_run=dry_run)
    if as_json:
        _print_json(asdict(report))
        return
    table = _table("gc (dry run)" if dry_run else "gc", "what", "removed")
    for digest in report.removed_blobs:
        table.add_row("blob", f"sha256:{digest}")
    for digest in report.removed_checkouts:
        table.add_row("checkout", digest)
    for name in report.removed_temp:
        table.add_row("temp", name)
    console = _stdout()
    console.print(table)
    console.print(f"freed {_size(report.freed_bytes)}; {report.kept_blobs} referenced blob(s) kept")


COMMANDS: dict[str, Callable[..., None]] = {
    "list": list_versions,
    "show": show,
    "aliases": aliases,
    "set-alias": set_alias,
    "rollback": rollback,
    "pin": pin,
    "unpin": unpin,
    "history": history,
    "gc": gc,
}
