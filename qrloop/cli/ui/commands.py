"""The operator's commands, mounted by ``qrloop/cli.py``: ``qrloop status``, ``qrloop ui``,
``qrloop prometheus config`` and ``qrloop kafka clean-runs``.

Like the rest of the CLI, each command imports its machinery when it runs: every role of the loop starts as
a ``qrloop`` process, and matplotlib, scipy (through the canary) and starlette would add seconds to each.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from qrloop.settings import REPO_ROOT, get_settings

RULES_FILE = REPO_ROOT / "ops" / "prometheus" / "qrloop-rules.yml"
prometheus_app = typer.Typer(help="Prometheus for the daemon's roles (scripts/prometheus.sh).")


def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    broker: Annotated[bool, typer.Option(help="Also read lag, rewards and dead letters from Kafka.")] = True,
) -> None:
    """The loop on one screen: versions and lineage, alias moves, the canary, lag, dead letters."""
    from sqlalchemy.exc import DatabaseError

    from qrloop.cli.ui.terminal import render
    from qrloop.runs import open_store
    from qrloop.status import gather

    settings = get_settings()
    try:
        with open_store(settings) as store:
            summary = gather(store, settings, broker=broker)
    except DatabaseError as exc:  # a read-only view does not migrate; say what would
        Console(stderr=True).print(f"[red]error:[/] the policy store cannot be read ({exc.orig}); "
                                   "is it migrated? qrloop db upgrade")  # fmt: skip
        raise typer.Exit(2) from None
    console = Console()
    if as_json:
        console.print_json(json.dumps(summary.as_dict()))
    else:
        render(summary, settings, console)


def ui_command(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (default: ui.port).")] = 0,
) -> None:
    """Serve the read-only status page on 127.0.0.1 (it refreshes itself every ui.refresh_s)."""
    from qrloop.cli.ui.app import serve

    settings = get_settings()
    port = port or settings.ui.port
    Console(stderr=True).print(f"status page on http://127.0.0.1:{port}/ (JSON: /api/status)")
    serve(settings, port)


@prometheus_app.command("config")
def prometheus_config(
    rules: Annotated[Path | None, typer.Option(help="Alert rule file to load.")] = RULES_FILE,
    ui: Annotated[bool, typer.Option(help="Scrape the status page (ui.port) too.")] = True,
) -> None:
    """Print a scrape config for every role's /metrics (ports from the settings) and the alert rules."""
    from qrloop.cli.ui.prometheus import scrape_config

    typer.echo(scrape_config(get_settings(), rules, ui), nl=False)


def clean_runs_command(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
    keep: Annotated[list[str] | None, typer.Option(help="A run id to keep (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Delete the topics (and consumer-group offsets) of old `qrloop demo` runs; running runs are kept."""
    from qrloop.cli.ui.terminal import compact_table
    from qrloop.topics import clean_runs

    report = clean_runs(get_settings(), dry_run=dry_run, keep=keep or ())
    console = Console()
    if as_json:
        console.print_json(json.dumps([asdict(r) for r in report]))
        return
    table = compact_table("demo runs on the broker", "run", "topics", "deleted", "why")
    for r in report:
        table.add_row(r.run_id, str(len(r.topics)), "yes" if r.deleted else "no", r.why)
    console.print(table if report else "no demo run topics on the broker")


# Kafka's own tools as `qrloop kafka topics|groups|consume`: scripts/kafka.sh runs them, options pass on.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _kafka_tool(*args: str) -> None:
    script = REPO_ROOT / "scripts" / "kafka.sh"
    raise typer.Exit(subprocess.run(["bash", str(script), *args], check=False).returncode)


def kafka_topics_command(ctx: typer.Context) -> None:
    """kafka-topics on the broker: the topic names (options instead, e.g. --describe --topic T)."""
    _kafka_tool("topics", *ctx.args)


def kafka_groups_command(ctx: typer.Context) -> None:
    """kafka-consumer-groups on the broker: every group's offsets and lag per partition."""
    _kafka_tool("groups", *ctx.args)


def kafka_consume_command(
    ctx: typer.Context, topic: Annotated[str, typer.Argument(help="Topic to read.")]
) -> None:
    """kafka-console-consumer: TOPIC from the beginning (options added, e.g. --max-messages 10)."""
    _kafka_tool("consume", topic, *ctx.args)
