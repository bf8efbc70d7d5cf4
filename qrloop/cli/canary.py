"""``qrloop canary``: run the canary job, or show where the canary stands (mounted by ``qrloop.cli.main``)."""

from __future__ import annotations

import json
import logging
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from qrloop.runs import open_store
from qrloop.settings import get_settings

app = typer.Typer(
    help="Canary promotion: analyse the canary arm and promote or roll back.", no_args_is_help=True
)
console = Console()


@app.command("run")
def run_command() -> None:
    """The canary job (APScheduler): every canary.interval_s, analyse the last window and act."""
    # Inside the commands: the canary job imports scipy (5 s here), and this app is mounted into every
    # `qrloop` invocation.
    from qrloop.canary_job import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run()


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


@app.command("status")
def status_command(
    limit: int = typer.Option(5, help="How many recent verdicts to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Current aliases and share, and the latest analyses with their statistics."""
    from qrloop.canary_job import summary  # scipy: see run_command

    settings = get_settings()
    with open_store(settings) as store:
        status = summary(store, settings.canary, limit)
    if as_json:
        console.print_json(json.dumps(status, default=str))
        return
    config = settings.canary
    live = (
        f"[green]live[/] at {status['share']:.0%} of shoppers, "
        f"{status['inconclusive_windows']}/{config.max_windows} inconclusive windows"
        if status["live"]
        else "[dim]no canary being served[/]"
    )
    console.print(
        f"{config.production_alias} → [bold]{status['production']}[/]   "
        f"{config.canary_alias} → [bold]{status['canary']}[/]   {live}"
    )
    table = Table(
        "when", "canary", "verdict", "n prod/can", "mean prod", "mean can", "effect", "p", "rel ratio",
        "KL", "share", "reason",
        title=f"last {limit} analyses",
    )  # fmt: skip
    for v in status["verdicts"]:
        colour = {"promote": "green", "rollback": "red"}.get(str(v.get("verdict")), "yellow")
        table.add_row(
            str(v["at"])[:19],
            str(v["version"]),
            f"[{colour}]{v.get('verdict')}[/]",
            f"{v.get('n_production')}/{v.get('n_canary')}",
            _fmt(v.get("mean_production")),
            _fmt(v.get("mean_canary")),
            _fmt(v.get("effect"), "+.3f"),
            _fmt(v.get("p_value"), ".3g"),
            _fmt(v.get("relevance_ratio"), ".2f"),
            _fmt(v.get("mean_kl"), ".2f"),
            _fmt(v.get("share"), ".0%"),
            str(v.get("reason", "")),
        )
    console.print(table)
