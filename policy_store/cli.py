"""``qrloop policy ...``: inspect versions and move aliases by hand.

The store comes from ``qrloop.settings.get_settings()``; the schema is brought up to date first (Alembic
``upgrade head`` is a no-op when current). Refusals (unknown version/alias, nothing to roll back to, ...)
print one red line and exit with status 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from policy_store.entities import AuditEntry, PolicyVersion
from policy_store.errors import PolicyStoreError
from policy_store.store import PolicyStore

app = typer.Typer(help="Policy versions, aliases and their audit log.", no_args_is_help=True)

EXIT_REFUSED = 2


def _stdout() -> Console:
    # Built per command, not at import: CliRunner (and redirections) swap sys.stdout after import.
    return Console()


@contextmanager
def _store() -> Iterator[PolicyStore]:
    from qrloop.db import upgrade
    from qrloop.settings import get_settings

    settings = get_settings()
    try:
        upgrade(settings.db_url)
        with PolicyStore.from_settings(settings) as store:
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


@app.command("list")
def list_versions(
    status: Annotated[str | None, typer.Option(help="Only versions with this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Versions, newest first, with the aliases that hold them."""
    with _store() as store:
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


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="Version id or alias.")], as_json: JsonFlag = False
) -> None:
    """Everything recorded about one version."""
    with _store() as store:
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


@app.command("aliases")
def aliases(as_json: JsonFlag = False) -> None:
    """Every alias and the version it points at."""
    with _store() as store:
        records = store.aliases()
    if as_json:
        _print_json([asdict(r) for r in records.values()])
        return
    table = _table("aliases", "alias", "version", "updated (UTC)", "moves")
    for r in records.values():
        table.add_row(r.alias, str(r.version_id), _time(r.updated_at), str(r.generation))
    _stdout().print(table)


@app.command("set-alias")
def set_alias(
    alias: Annotated[str, typer.Argument(help="Alias to move (created if new).")],
    version: Annotated[str, typer.Argument(help="Version id (or another alias) to point it at.")],
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
) -> None:
    """Point an alias at a version."""
    with _store() as store:
        entry = store.set_alias(alias, _resolve_ref(store, version).id, reason=reason, actor="cli")
    _stdout().print(f"{alias}: {entry.from_version} → {entry.to_version}")


@app.command("rollback")
def rollback(
    alias: Annotated[str, typer.Argument(help="Alias to move back.")],
    to: Annotated[
        str | None, typer.Option(help="Version id to go back to (default: previous holder).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
) -> None:
    """Move an alias back to its previous holder (or to --to)."""
    with _store() as store:
        target = None if to is None else _resolve_ref(store, to).id
        entry = store.rollback(alias, to=target, reason=reason, actor="cli")
    _stdout().print(f"{alias}: {entry.from_version} → {entry.to_version} (rollback)")


@app.command("history")
def history(alias: Annotated[str, typer.Argument(help="Alias.")], as_json: JsonFlag = False) -> None:
    """The audit rows about one alias, newest first."""
    with _store() as store:
        entries = store.history(alias)
    if as_json:
        _print_json([asdict(e) for e in entries])
        return
    _stdout().print(_audit_table(f"history of {alias}", entries))


@app.command("gc")
def gc(
    retention_hours: Annotated[
        float, typer.Option(help="Keep unreferenced blobs younger than this many hours.")
    ] = 24.0,
    dry_run: Annotated[bool, typer.Option(help="Only report what would be removed.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove blobs no version references (and stale temp files)."""
    with _store() as store:
        report = store.gc(timedelta(hours=retention_hours), actor="cli", dry_run=dry_run)
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
