"""The ``qrloop`` command line (typer + rich). Each command is a thin shell over a function elsewhere.

The composition root: it builds what the components need (a policy store, a search function) from the
settings and passes it down. A command that starts a role imports that role's module inside the command:
importing them all here would make every ``qrloop`` invocation (``--help``, ``config show``) load torch, faust
and pandas first, about 15 s on this machine. Those are the only imports kept inside functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from learner.offline.cli import app as offline_app
from policy_store import db
from policy_store.cli import build_app as build_policy_app
from qrloop import logs, models
from qrloop.cli import daemon
from qrloop.cli.canary import app as canary_app
from qrloop.cli.daemon import retention_defaults
from qrloop.cli.ui import commands as ui_commands
from qrloop.prompting import Hints
from qrloop.runs import open_migrated_store, open_store
from qrloop.settings import REPO_ROOT, Settings, get_settings
from qrloop.topics import ensure_topics, grow_topics
from simulators.cli import app as sim_app

if TYPE_CHECKING:
    from qrloop.serving import Ranker  # torch: a type only
    from simulators.search import SearchEngine  # tantivy: a type only

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


# Components own their sub-commands; the root only mounts them (and gives the policy commands their store).
policy_app = build_policy_app(
    lambda: open_migrated_store(get_settings()), lambda: retention_defaults(get_settings().retention)
)
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
    from qrloop import data  # pandas

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
    from learner.offline.relevance import train_relevance  # torch and sentence-transformers

    report = train_relevance(get_settings())
    console.print_json(json.dumps(report, default=str))


@models_app.command("train-relevance-head")
def models_train_relevance_head(
    force: bool = typer.Option(False, help="Retrain even when a trained M1 for this data set is present."),
    max_pairs: int = typer.Option(8_000, help="Training-split labelled pairs (seeded subsample)."),
    baseline: bool = typer.Option(False, help="Also score the plain cosine on the held-out labels."),
) -> None:
    """Train M1 as a small head on frozen MiniLM embeddings (training-split labels; about a minute on CPU).
    Skips when the data set already has a trained M1 (head or fine-tuned), so set-up can run it every time;
    a head trained before random negatives is retrained."""
    from learner.offline.relevance_head import outdated, train_relevance_head
    from qrloop import relevance

    settings = get_settings()
    folder = relevance.relevance_dir(settings)
    report = relevance.read_report(folder)
    if report is not None and relevance.report_problem(report, settings) is None:
        if outdated(report):
            console.print(f"relevance model M1 in {folder} was trained without random negatives: retraining")
        elif not force:
            console.print(f"[green]relevance model M1 already trained[/] ({report.get('kind')}) in {folder}")
            return
    report = train_relevance_head(settings, max_pairs=max_pairs, baseline=baseline)
    console.print_json(json.dumps(report, default=str))


@models_app.command("embed-catalog")
def models_embed_catalog(
    limit: int = typer.Option(None, help="Only the catalog's first N distinct product texts (default: all)."),
) -> None:
    """Precompute the catalog's product embeddings for M1's encoder (one memory-mapped matrix per data set):
    the aggregator then scores catalog products without an encoder forward. Several CPU minutes for the full
    Home Depot catalog; a rerun continues where an interrupted one stopped. Not part of set-up."""
    from learner.offline.catalog_embeddings import embed_catalog  # torch and sentence-transformers

    started, printed = time.monotonic(), [0]
    with console.status("loading the catalog and M1's encoder...") as status:

        def progress(done: int, wanted: int) -> None:
            status.update(f"encoding product texts: {done:,} / {wanted:,}")
            if done - printed[0] >= 5_000 or done == wanted:  # a line now and then, for logs too
                printed[0] = done
                console.print(f"{done:,} / {wanted:,} product texts ({time.monotonic() - started:.0f} s)")

        report = embed_catalog(get_settings(), limit=limit, progress=progress)
    what = (
        "already covered" if report.encoded == 0 else f"encoded {report.encoded:,} in {report.seconds:.0f} s"
    )
    console.print(
        f"[green]catalog embeddings[/] ({report.kind} encoder): {report.rows:,} of {report.catalog_texts:,} "
        f"product texts in {report.folder} ({what})"
    )


# --- db -----------------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations (the same as `alembic upgrade head`)."""
    url = get_settings().db_url
    db.upgrade(url, revision)
    console.print(f"[green]database at {revision}[/]: {_redact(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. 'base'.")) -> None:
    """Revert migrations down to REVISION."""
    db.downgrade(get_settings().db_url, revision)
    console.print(f"[yellow]database at {revision}[/]")


def _redact(url: str) -> str:
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
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """Check broker, database, models and data; print the exact command that fixes each problem."""
    from qrloop.cli.doctor import run_checks  # pandas (the data check)

    results = run_checks(get_settings())
    if as_json:
        print(json.dumps([asdict(r) for r in results]))
        raise typer.Exit(0 if all(r.ok for r in results) else 1)
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
    from qrloop.cli.smoke import run_smoke  # pandas, torch

    ok = run_smoke(get_settings(), console)
    if not ok:
        raise typer.Exit(1)


# --- the online loop's roles -------------------------------------------------------------------------------


def _logging() -> None:
    # settings.logging: text or JSON lines (QRLOOP_LOGGING__FORMAT=json; `qrloop run --log-format json`).
    config = get_settings().logging
    logs.configure(config.level, config.format)


@app.command()
def serve(
    port: int = typer.Option(8700, help="HTTP port of the rewriter (POST /rewrite)."),
    alias: str = typer.Option("production", help="Alias whose version is served."),
) -> None:
    """The rewriter: two sampled rewrites per query from the aliased policy, published as query events
    (with ``rewriter.samples`` > 2, the best two of that many by the reward's novelty under M1)."""
    from qrloop.serving import run  # torch
    from simulators.search import SearchEngine  # tantivy, pandas

    _logging()
    settings = get_settings()
    # The rewriter searches with whatever engine the root gives it; here, the simulated one over the catalog.
    engine = SearchEngine.open(settings)
    rank = novelty_ranker(settings) if settings.rewriter.samples > 2 else None
    vocabulary = served_vocabulary_texts(settings)
    run(
        settings,
        open_store(settings),
        engine.search,
        port,
        alias,
        rank,
        vocabulary,
        catalog_hints(settings, engine),
    )


def catalog_hints(settings: Settings, engine: SearchEngine) -> Hints:
    """What a hinted policy's prompt shows: the words of the titles of the query's results in ``engine``."""
    from qrloop.catalog import Catalog  # pandas

    catalog = Catalog.open(settings)
    return catalog.hints(engine.search)


def served_vocabulary_texts(settings: Settings) -> list[str] | None:
    """The texts whose tokens a served policy may write (``rewriter.vocabulary``): None for all tokens."""
    return catalog_vocabulary_texts(settings) if settings.rewriter.vocabulary == "catalog" else None


def catalog_vocabulary_texts(settings: Settings) -> list[str]:
    """What a catalog-vocabulary rewriter may write in: the products' texts and the training queries (a
    held-out query never shapes what is served)."""
    from qrloop.data import load_prepared  # pandas

    dataset = load_prepared(settings)
    return [*dataset.products["text"], *dataset.train_queries["query"]]


def novelty_ranker(settings: Settings) -> Ranker:
    """Best-of-N serving ranks candidates by the gain's novelty under the aggregator's own M1 and τ, so
    serving prefers exactly what the learner would later be paid for (before any shopper has seen it)."""
    from qrloop.rewards import list_novelties
    from streams.aggregator import make_relevance_fn  # torch, sentence-transformers

    relevance = make_relevance_fn(settings)
    return lambda query, original, lists: list_novelties(
        query, original, lists, relevance, relevance.relevant_above
    )


@app.command()
def aggregate() -> None:
    """The Faust aggregator: query events + interactions -> preference pairs."""
    from streams.aggregator import run  # faust, sentence-transformers

    _logging()
    # Faust's App.main() reads its own command line; give it the worker command. --without-web: Faust's
    # worker CLI would otherwise turn its web server on (0.0.0.0:6066) whatever the app says, and a second
    # aggregator on the host would then fail to bind; /metrics and the health probes are our own server.
    sys.argv = [sys.argv[0], "worker", "--loglevel", "info", "--without-web"]
    run()


@app.command()
def learn(
    nproc: int = typer.Option(
        0, help="Data-parallel ranks (torch.distributed: gloo on CPU, NCCL on GPUs); 0: dpo.nproc."
    ),
) -> None:
    """The DPO learner: one step per batch of pairs, each published as a version with its offsets."""
    from learner.distributed import launch  # torch

    _logging()
    launch(nproc or get_settings().dpo.nproc)


@app.command()
def shop(
    queries: int = typer.Option(320, help="How many simulated queries to send."),
    rewriter: str = typer.Option("http://127.0.0.1:8700", help="The rewriter service's URL."),
    rate: float = typer.Option(0.0, help="Queries per second (0: as fast as the rewriter answers)."),
    wait_ready: float = typer.Option(0.0, help="Wait this long for the rewriter to answer /readyz."),
) -> None:
    """Simulated shoppers: search through the rewriter, then click, add to cart and buy."""
    from simulators.driver import run, wait_until_ready  # pandas

    _logging()
    if wait_ready:
        wait_until_ready(rewriter, wait_ready)
    run(queries, rewriter, rate)


@offline_app.command("warm-start")
def offline_warm_start(
    steps: int = typer.Option(40, help="SFT steps (the demo's one-time warm start takes 40)."),
    titles: bool = typer.Option(
        False,
        "--titles",
        help="Add title pairs: each training query → the first words of a judged-relevant product its own "
        "results miss (learner.offline.q2q.title_pairs; README, 'How far two rewrites could go').",
    ),
    expansions: bool = typer.Option(
        False,
        "--expansions",
        help="With --titles, add expansion pairs too: each training query plus the one word of its results' "
        "titles that finds the most judged-relevant products it misses (q2q.expansion_pairs).",
    ),
    hints: bool = typer.Option(
        False,
        "--hints",
        help="A hinted policy: its prompt shows the query's results' words (qrloop.prompting; README, 'What "
        "the policy cannot know'); every rewriter and learner then builds that prompt for it.",
    ),
) -> None:
    """The demo's quick warm start, run on purpose: SFT on the unverified Q2Q pairs, published as
    `production` for the configured data set (declared here, not in learner/, because only the composition
    root may hand the learner the simulated search engine that title pairs and hints need)."""
    from learner.offline.build import warm_start
    from simulators.search import SearchEngine

    if expansions and not titles:
        raise typer.BadParameter("--expansions needs --titles (both search the catalog)")
    settings = get_settings()
    db.upgrade(settings.db_url)
    engine = SearchEngine.open(settings) if titles or hints else None
    search = engine.search if engine is not None and titles else None
    hinted = correct = None
    if engine is not None and hints:
        from qrloop.catalog import Catalog  # pandas

        catalog = Catalog.open(settings)
        # the hints search a query as the catalog spells it; so do the expansions they are shown with
        hinted, correct = catalog.hints(engine.search), catalog.speller.correct
    version = warm_start(
        settings, steps=steps, search=search, expansions=expansions, hints=hinted, correct=correct
    )
    console.print(f"warm start published as version {version} ('production') in {settings.db_url}")


@offline_app.command("student")
def offline_student(
    layers: int = typer.Option(15, help="Decoder layers the student keeps (the teacher has 30)."),
    steps: int = typer.Option(300, help="SFT steps of the cut student on the warm start's pairs."),
    distill_steps: int = typer.Option(
        500, help="Steps of SFT on the teacher's own sampled rewrites after the SFT on pairs (0: none)."
    ),
    teacher_queries: int = typer.Option(1200, help="Training queries the teacher rewrites (two each)."),
    publish: bool = typer.Option(True, help="Publish the student as 'production' (else only measure)."),
) -> None:
    """The warm start's student: drop the contiguous block of the warm-started teacher's layers that costs
    least, SFT the cut on the same pairs, distil the teacher into it, print Table 2 and serving time, publish
    it as 'production' (declared here, like warm-start: a hinted teacher's student needs the catalog's
    hints, which only the composition root may build)."""
    from learner.offline.build import StudentConfig, warm_start_is_hinted, warm_start_student
    from learner.offline.cli import progress_bars
    from simulators.search import SearchEngine

    settings = get_settings()
    config = StudentConfig(
        layers=layers,
        steps=steps,
        distill_steps=distill_steps,
        teacher_queries=teacher_queries,
        publish=publish,
    )
    hints = catalog_hints(settings, SearchEngine.open(settings)) if warm_start_is_hinted(settings) else None
    with progress_bars() as progress:
        report = warm_start_student(settings, config, progress, hints)
    console.print(f"kept layers {report.kept_layers} of the teacher's {report.teacher_layers}")
    console.print(
        "Table 2 (T P: the warm-started teacher; S V: the untrained cut; S P: after SFT; T→S P: distilled"
        + (", all on the hinted prompt)" if report.hinted else ")")
    )
    console.print(report.table(), soft_wrap=True)
    serving = report.serving
    console.print(
        f"serving: T {serving['T']['median_s'] * 1000:.0f} ms, S {serving['S']['median_s'] * 1000:.0f} ms "
        f"per query (S/T {report.serving_ratio():.2f})"
    )
    if report.version is not None:
        console.print(f"[green]published[/] the student as version {report.version} ('production')")


@app.command()
def demo(
    queries: int = typer.Option(320, help="Simulated queries to run through the loop."),
    warm_start_steps: int = typer.Option(
        40, help="SFT steps of the one-time warm start when no offline policy is published (0: none)."
    ),
    lora_r: int = typer.Option(
        16,
        help="Rank of the LoRA adapters the demo's learner trains (dpo.lora_r; versions of a few MB). "
        "0: full fine-tuning (540 MB versions). QRLOOP_DPO__LORA_R wins.",
    ),
    learning_rate: float | None = typer.Option(
        None,
        help="DPO learning rate of the demo's learner; default 1e-3 with LoRA, 3e-5 with full fine-tuning. "
        "Higher than dpo.learning_rate (5e-6, full fine-tuning in a daemon that runs for days) so that 20 "
        "steps move the policy visibly; QRLOOP_DPO__LEARNING_RATE wins.",
    ),
    keep_topics: bool = typer.Option(
        False,
        "--keep-topics",
        help="Keep the run's Kafka topics at the end (benchmarks and `qrloop export` read them); by default "
        "they are deleted, and `qrloop kafka clean-runs` deletes those of older runs.",
    ),
) -> None:
    """The online loop end to end on simulated traffic, with live progress and a reward curve."""
    from qrloop.cli.demo import demo_learning_rate, run_demo  # every role's imports

    run_demo(
        get_settings(),
        queries,
        console,
        warm_start_steps=warm_start_steps,
        learning_rate=demo_learning_rate(lora_r) if learning_rate is None else learning_rate,
        keep_topics=keep_topics,
        lora_r=lora_r,
    )


topics_app = typer.Typer(help="Kafka topics of the online loop.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic with the configured partition counts (idempotent)."""
    for name in ensure_topics(get_settings()):
        console.print(f"[green]ok[/] {name}")


@topics_app.command("grow")
def topics_grow() -> None:
    """Raise existing topics to the configured partition counts (stop the rewriter and drain first)."""
    grown = grow_topics(get_settings())
    for name, (before, after) in grown.items():
        console.print(f"[green]grown[/] {name}: {before} -> {after} partitions")
    if not grown:
        console.print("every topic already has the configured partition count")


# --- the daemon: every role, supervised (qrloop/cli/daemon.py) --------------------------------------------


@app.command("run")
def run_cmd(
    roles: str = typer.Option(
        "",
        help="Comma-separated roles (serve,aggregate,learn,canary) or 'all'; default: settings.daemon.roles.",
    ),
    log_format: str = typer.Option("", help="text or json (default: settings.logging.format)."),
    ui: bool = typer.Option(
        False, "--ui", help="Also serve the status page on 127.0.0.1:ui.port (as ui.with_run does)."
    ),
) -> None:
    """Start the roles as supervised processes (restarted with backoff); SIGTERM stops them all."""
    if log_format:
        if log_format not in ("text", "json"):
            fail("--log-format is text or json")
        os.environ["QRLOOP_LOGGING__FORMAT"] = log_format
        get_settings.cache_clear()
    settings = get_settings()
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        chosen = daemon.resolve_roles(roles or settings.daemon.roles)
    except ValueError as exc:
        fail(str(exc))
    if (ui or settings.ui.with_run) and "ui" not in chosen:
        chosen.append("ui")
    raise typer.Exit(daemon.run(settings, chosen))


# --- logged traffic: export, replay, off-policy evaluation (streams/replay.py) ----------------------------


@app.command("export")
def export_cmd(
    out: str = typer.Argument(..., help="Log file to write: .jsonl, or .parquet."),
) -> None:
    """Write the query events and interactions on the topics as one replayable log, in event-time order."""
    from streams.replay import export_log  # faust, sentence-transformers (in-process attribution)

    report = export_log(get_settings(), Path(out))
    console.print(
        f"[green]exported[/] {report.queries} query events, {report.interactions} interactions, "
        f"{report.session_ends} session ends to {report.path}"
        + (f" ([yellow]{report.skipped} unreadable records skipped[/])" if report.skipped else "")
    )


@app.command("replay")
def replay_cmd(
    source: str = typer.Argument(..., help="A .jsonl or .parquet log, or kafka:TOPIC[,TOPIC][:START-END]."),
    rate: float = typer.Option(0.0, help="Events per second (0: as fast as possible)."),
    dead_letter: bool = typer.Option(
        False, "--dead-letter", help="Send malformed entries to the dead-letter topic instead of stopping."
    ),
    in_process: bool = typer.Option(
        False,
        "--in-process",
        help="Attribute the log here (the aggregator's functions, event-time order) and publish the "
        "preference pairs instead of the raw events: bit-reproducible training, no aggregator needed.",
    ),
) -> None:
    """Re-publish a traffic log to the configured topics in event-time order."""
    from streams.replay import LogFormatError, replay  # faust, sentence-transformers

    try:
        report = replay(get_settings(), source, rate, dead_letter, in_process)
    except (LogFormatError, FileNotFoundError, ValueError) as exc:
        fail(f"{exc}" + ("" if dead_letter else "\n(--dead-letter sends bad entries aside and goes on)"))
    topics = ", ".join(f"{n} to {t}" for t, n in report.by_topic.items()) or "nothing"
    console.print(
        f"[green]replayed[/] {report.published} events ({topics}) in {report.seconds:.1f} s "
        f"({report.rate:,.0f}/s)"
        + (f", {report.dead_lettered} dead-lettered" if report.dead_lettered else "")
    )


@app.command("evaluate")
def evaluate_cmd(
    candidate: str = typer.Option(..., "--candidate", help="Version id or alias in the policy store."),
    log_file: str = typer.Option(..., "--log", help="A .jsonl or .parquet log, or kafka:TOPIC[:START-END]."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
) -> None:
    """Off-policy estimate (IPS, SNIPS) of a candidate version's reward on logged traffic."""
    from qrloop.cli.evaluate import evaluate  # torch
    from streams.replay import LogFormatError

    try:
        settings = get_settings()
        result = evaluate(settings, candidate, log_file, vocabulary_texts=served_vocabulary_texts(settings))
    except (LogFormatError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        console.print_json(json.dumps(result.as_dict()))
        return
    est = result.estimate
    table = Table("estimator", "value", "95% CI", title=f"off-policy evaluation of {result.candidate}")
    table.add_row("logged (on-policy) mean reward", f"{result.logged_mean_reward:.4f}", "")
    table.add_row("IPS", f"{est.ips:.4f}", f"[{est.ips_ci[0]:.4f}, {est.ips_ci[1]:.4f}]")
    table.add_row("SNIPS", f"{est.snips:.4f}", f"[{est.snips_ci[0]:.4f}, {est.snips_ci[1]:.4f}]")
    console.print(table)
    versions = ", ".join(f"{v}: {n}" for v, n in result.serving_versions.items())
    console.print(
        f"{result.queries} queries, {est.n} logged rewrites (serving versions {versions}); effective sample "
        f"size {est.ess:.1f}, largest weight {est.max_weight_share:.0%} of the total, mean weight "
        f"{result.mean_weight:.2f} (1 when the log covers the candidate), mean log-ratio "
        f"{result.mean_log_ratio:+.2f}"
    )
    if est.warning:
        err.print(f"[bold yellow]warning:[/] {est.warning}")


# --- the operator's view: status, status page, Prometheus, demo topics (qrloop/status.py, qrloop/cli/ui/) ---

app.command("status")(ui_commands.status_command)
app.command("ui")(ui_commands.ui_command)
app.add_typer(ui_commands.prometheus_app, name="prometheus")
kafka_app.command("clean-runs")(ui_commands.clean_runs_command)
kafka_app.command("topics", context_settings=ui_commands.PASS_THROUGH)(ui_commands.kafka_topics_command)
kafka_app.command("groups", context_settings=ui_commands.PASS_THROUGH)(ui_commands.kafka_groups_command)
kafka_app.command("consume", context_settings=ui_commands.PASS_THROUGH)(ui_commands.kafka_consume_command)
