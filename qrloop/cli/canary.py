"""``qrloop canary``: run the canary job, or show where the canary stands (mounted by ``qrloop.cli.main``)."""

from __future__ import annotations

import json
import logging
from typing import Any

import typer
from rich.console import Console

from qrloop.cli.ui.terminal import compact_table
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


# Three significant digits, not three decimals: the gain's mean is ~0.012 and its intervals ~±0.002, which
# ".3f" printed as 0.012/0.013 and [+0.000,+0.002].
def _fmt(value: Any, spec: str = ".3g") -> str:
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
        f"[green]live[/] at {status['share']:.0%} of shoppers, {status['analyses']} analyses "
        f"(inconclusive after {config.max_queries} canary queries or {config.max_analyses} analyses)"
        if status["live"]
        else "[dim]no canary being served[/]"
    )
    console.print(
        f"{config.production_alias} → [bold]{status['production']}[/]   "
        f"{config.canary_alias} → [bold]{status['canary']}[/]   {live}"
    )
    # Fits 80 columns, in a terminal or a pipe (cells cut, the reason folds); KL, share and the full figures
    # are in --json.
    columns = ("when (UTC)", "ver", "outcome", "n p/c", "reward p/c", "interval", "rel p/c", "reason")
    table = compact_table(f"last {limit} analyses", *columns)
    for v in status["verdicts"]:
        verdict = str(v.get("verdict"))
        colour = {"promote": "green", "rollback": "red", "inconclusive": "magenta"}.get(verdict, "yellow")
        low, high = v.get("effect_low"), v.get("effect_high")
        table.add_row(
            str(v["at"])[5:19].replace("T", " "),
            str(v["version"]),
            f"[{colour}]{v.get('outcome') or verdict}[/]",
            f"{v.get('n_production')}/{v.get('n_canary')}",
            f"{_fmt(v.get('mean_production'))}/{_fmt(v.get('mean_canary'))}",
            "–" if low is None or high is None else f"[{low:+.2g},{high:+.2g}]",
            f"{_fmt(v.get('relevance_production'))}/{_fmt(v.get('relevance_canary'))}",
            str(v.get("reason", "")),
        )
    console.print(table)


@app.command("power")
def power_command(
    effect: float = typer.Option(0.10, help="True relative improvement of the mean reward (0.10: +10%)."),
    mean: float = typer.Option(
        0.012, help="Production's mean reward per query (default: the gain in a 320-query demo run)."
    ),
    sd: float = typer.Option(0.021, help="Standard deviation of the reward per query (the same run)."),
    power: float = typer.Option(0.8, help="Probability of promoting such a candidate."),
    relevance_mean: float = typer.Option(0.31, help="Mean relevance per query (the guard's margin scales)."),
    relevance_sd: float = typer.Option(0.15, help="Standard deviation of the relevance per query."),
) -> None:
    """Canary queries (per arm) the rule needs to promote a given true improvement with the given power."""
    from qrloop.canary import queries_for_power
    from qrloop.canary_job import policy_of

    policy = policy_of(get_settings().canary)
    for ratio, label in ((1.0, "equal arms (share 0.5)"), (3.0, "production 3× canary (share 0.25)")):
        n = queries_for_power(
            effect, mean, sd, policy, power, ratio, relevance=(relevance_mean, relevance_sd)
        )
        gain = f"{effect:+.0%} (+{effect * mean:.4f})"
        console.print(f"{label}: {n} canary queries for {power:.0%} power at {gain}")
    console.print(f"canary.max_queries is {policy.max_queries}")
