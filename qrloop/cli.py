"""The ``qrloop`` command line (typer + rich). Each command is a thin shell over a function elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import typer
from rich.console import Console
from rich.table import Table

from qrloop.settings import REPO_ROOT, get_settings

console = Console()
err = Console(stderr=True)

app = typer.Typer(help="qrloop: streaming online RL for e-commerce query rewriting.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare the product-search data into the cache.", no_args_is_help=True)
models_app = typer.Typer(help="Prepare the policy and relevance models.", no_args_is_help=True)
db_app = typer.Typer(help="Policy-store database migrations (Alembic).", no_args_is_help=True)
kafka_app = typer.Typer(help="The local single-node Kafka broker (scripts/kafka.sh).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(kafka_app, name="kafka")


def _mount_component_clis() -> None:
    # Components own their sub-commands; the core only mounts them.
    from learner.offline.cli import app as offline_app
    from policy_store.cli import app as policy_app
    from qrloop.canary_cli import app as canary_app
    from simulators.cli import app as sim_app

    app.add_typer(policy_app, name="policy", help="Versions, aliases, rollback and audit of policies.")
    app.add_typer(sim_app, name="sim", help="The simulated search engine, shoppers and judge.")
    app.add_typer(canary_app, name="canary", help="Canary promotion: run the job, show its status.")
    app.add_typer(offline_app, name="offline", help="The offline phase: Q2Q, SFT, distillation, MiniELM.")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# --- config -------------------------------------------------------------------------------------------------


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (defaults < qrloop.toml < QRLOOP_* environment)."""
    console.print_json(json.dumps(get_settings().describe()))


# --- data ---------------------------------------------------------------------------------------------------


@data_app.command("prepare")
def data_prepare(force: bool = typer.Option(False, help="Rebuild even when the cache is current.")) -> None:
    """Read QRLOOP_DATA_DIR/QRLOOP_DATASET and write the internal tables into the cache."""
    from qrloop import data

    settings = get_settings()
    try:
        folder = data.prepare(settings, force=force)
    except data.DataFormatError as exc:
        fail(str(exc))
    meta = json.loads((folder / "meta.json").read_text())
    console.print(f"[green]prepared[/] {meta['dataset']} into {folder}")
    table = Table("table", "rows")
    for key in ("products", "queries", "heldout_queries", "labels"):
        table.add_row(key, f"{meta[key]:,}")
    console.print(table)


# --- models -------------------------------------------------------------------------------------------------


@models_app.command("prepare")
def models_prepare(
    force: bool = typer.Option(False, help="Convert again even when already prepared."),
) -> None:
    """Convert SmolLM2-135M-Instruct from the shipped GGUF into an HF safetensors directory in the cache."""
    from qrloop import models

    settings = get_settings()
    try:
        with console.status("converting the GGUF (10-20 s)..."):
            report = models.prepare_policy(settings, force=force)
        encoder = models.encoder_dir(settings)
    except models.ModelMissingError as exc:
        fail(str(exc))
    if report is None:
        console.print(f"[green]policy already prepared[/] in {models.policy_dir(settings)}")
    else:
        console.print(
            f"[green]policy prepared[/] in {report.out_dir}: {report.parameters:,} parameters, "
            f"GGUF load {report.gguf_load_s:.1f} s, safetensors load {report.saved_load_s:.2f} s, "
            f"max logit difference {report.max_logit_diff}"
        )
    console.print(f"[green]relevance encoder[/] all-MiniLM-L6-v2 at {encoder}")


@models_app.command("train-relevance")
def models_train_relevance() -> None:
    """Fine-tune the relevance model M1 on the training split's human labels (CPU, minutes)."""
    from qrloop.relevance import train_relevance

    report = train_relevance(get_settings())
    console.print_json(json.dumps(report, default=str))


# --- db -----------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations (the same as `alembic upgrade head`)."""
    from qrloop import db

    url = get_settings().db_url
    db.upgrade(url, revision)
    console.print(f"[green]database at {revision}[/]: {_redact(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. 'base'.")) -> None:
    """Revert migrations down to REVISION."""
    from qrloop import db

    db.downgrade(get_settings().db_url, revision)
    console.print(f"[yellow]database at {revision}[/]")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --- kafka --------------------------------------------------------------------------------------------------


def _kafka_script(action: str) -> None:
    script = REPO_ROOT / "scripts" / "kafka.sh"
    result = subprocess.run(["bash", str(script), action], check=False)
    raise typer.Exit(result.returncode)


@kafka_app.command("install")
def kafka_install() -> None:
    """Fetch the pinned broker jars from Maven Central (cached outside the repo)."""
    _kafka_script("install")


@kafka_app.command("start")
def kafka_start() -> None:
    """Start the broker and wait until it answers a metadata request."""
    _kafka_script("start")


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the broker cleanly; its data survives."""
    _kafka_script("stop")


@kafka_app.command("status")
def kafka_status() -> None:
    """Say whether the broker runs."""
    _kafka_script("status")


# --- doctor and smoke ---------------------------------------------------------------------------------------


@app.command()
def doctor() -> None:
    """Check broker, database, models and data; print the exact command that fixes each problem."""
    from qrloop.doctor import run_checks

    results = run_checks(get_settings())
    table = Table("check", "status", "detail / fix")
    for result in results:
        status = "[green]ok[/]" if result.ok else "[red]FAIL[/]"
        detail = result.detail if result.ok else f"{result.detail}\n[bold]fix:[/] {result.fix}"
        table.add_row(result.name, status, detail)
    console.print(table)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def smoke() -> None:
    """One event through Kafka, one row through SQLAlchemy, one rewrite from the real model."""
    from qrloop.smoke import run_smoke

    ok = run_smoke(get_settings(), console)
    if not ok:
        raise typer.Exit(1)


# --- the online loop's roles -------------------------------------------------------------------------------


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    port: int = typer.Option(8700, help="HTTP port of the rewriter (POST /rewrite)."),
    alias: str = typer.Option("production", help="Alias whose version is served."),
) -> None:
    """The rewriter: two sampled rewrites per query from the aliased policy, published as query events."""
    from qrloop.serving import run

    _logging()
    run(port, alias)


@app.command()
def aggregate() -> None:
    """The Faust aggregator: query events + interactions -> preference pairs."""
    from streams.aggregator import run

    _logging()
    # Faust's App.main() reads its own command line; give it the worker command.
    sys.argv = [sys.argv[0], "worker", "--loglevel", "info"]
    run()


@app.command()
def learn() -> None:
    """The DPO learner: one step per batch of pairs, each published as a version with its offsets."""
    from learner.worker import run

    _logging()
    run()


@app.command()
def shop(
    queries: int = typer.Option(320, help="How many simulated queries to send."),
    rewriter: str = typer.Option("http://127.0.0.1:8700", help="The rewriter service's URL."),
    rate: float = typer.Option(0.0, help="Queries per second (0: as fast as the rewriter answers)."),
    wait_ready: float = typer.Option(0.0, help="Wait this long for the rewriter to answer /readyz."),
) -> None:
    """Simulated shoppers: search through the rewriter, then click, add to cart and buy."""
    from simulators.driver import run, wait_until_ready

    _logging()
    if wait_ready:
        wait_until_ready(rewriter, wait_ready)
    run(queries, rewriter, rate)


@app.command()
def demo(
    queries: int = typer.Option(320, help="Simulated queries to run through the loop."),
    warm_start_steps: int = typer.Option(
        40, help="SFT steps of the one-time warm start when no offline policy is published (0: none)."
    ),
    learning_rate: float = typer.Option(
        3e-5,
        help="DPO learning rate of the demo's learner. Higher than dpo.learning_rate (5e-6, for a daemon "
        "that runs for days) so that 20 steps move the policy visibly; QRLOOP_DPO__LEARNING_RATE wins.",
    ),
) -> None:
    """The online loop end to end on simulated traffic, with live progress and a reward curve."""
    import os

    from qrloop.demo import run_demo

    os.environ.setdefault("QRLOOP_DPO__LEARNING_RATE", str(learning_rate))  # the roles read the environment
    run_demo(get_settings(), queries, console, warm_start_steps=warm_start_steps)


topics_app = typer.Typer(help="Kafka topics of the online loop.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic with the configured partition counts (idempotent)."""
    from qrloop.topics import ensure_topics

    for name in ensure_topics(get_settings()):
        console.print(f"[green]ok[/] {name}")


_mount_component_clis()


def main() -> None:  # pragma: no cover - console entry point indirection for `python -m qrloop`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
