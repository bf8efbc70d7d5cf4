"""``qrloop demo``: the whole online loop on simulated traffic, as separate processes, with live progress.

    shoppers ──HTTP──▶ rewriter ──▶ query-events ─┐
        └────────────────────────▶ interactions ──┴─▶ aggregator ──▶ preference-pairs ──▶ learner ──▶ store

Each demo run is isolated: its own topics (suffixed with the run id), its own SQLite policy store under
``<cache_dir>/runs/<run id>/`` with the run's weights beside it (``blobs/``), and its own Faust application
id, so runs never see each other's events and deleting a run's directory frees its disk. This process only
watches the topics, shows progress and, at the end, prints the versions and draws the reward curve.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bars
from rich.table import Table

from learner.evaluate_online import SpellingSignal, spelling_signal
from learner.offline.build import warm_start
from learner.offline.q2q import known_corrections
from policy_store import PolicyStore, PolicyVersion, UnknownAliasError, db
from qrloop import data, models
from qrloop.cli.doctor import check_kafka
from qrloop.cli.supervisor import Supervised, Supervisor, spawn_qrloop
from qrloop.data import dataset_name
from qrloop.events import PolicyAnnouncement, PreferencePair, QueryEvent, QueryOutcome, decode
from qrloop.rewards import is_echo, same_text
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunLayout:
    run_id: str
    run_dir: Path
    env: dict[str, str]
    settings: Settings
    rewriter_port: int


def run_settings(base: Settings, run_dir: Path) -> Settings:
    """The settings of the demo run in ``run_dir`` (its name is the run id): its own topics, store and
    consumer groups. Its versions live with it (with full fine-tuning a 1,000-query run publishes dozens of
    540 MB versions)."""
    return isolate(base, run_dir.name, run_dir, learner_name=f"demo-{run_dir.name}")


# The demo trains LoRA adapters (dpo.lora_r): versions of 7.4 MB instead of 540 MB, saved and published in
# 68 ms, a step 0.64× as long (benchmarks/bench_versions.py). Its learning rate is the one at which, on the
# same 8 batches of a run, rank 16 taught as much as full fine-tuning at the demo's 3e-5 by the human labels
# of held-out queries (benchmarks/bench_collapse.py --lora: recall ratio of the sampled rewrites 1.20 vs 1.11,
# misspellings corrected 13% vs 10%, 40 queries; at 3e-4 it barely moved, 1.00).
DEMO_LORA_R = 16
DEMO_LEARNING_RATE = {"lora": 1e-3, "full": 3e-5}


def demo_learning_rate(lora_r: int) -> float:
    return DEMO_LEARNING_RATE["lora" if lora_r > 0 else "full"]


def make_run(
    base: Settings,
    run_id: str | None = None,
    learning_rate: float | None = None,
    lora_r: int | None = None,
) -> RunLayout:
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
    run_dir = base.cache_dir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(base, run_dir)
    env = run_env(settings)
    # Four roles share the machine's cores. Torch's default of one OpenMP thread per core in every process
    # oversubscribes them, and a thread team waiting on a busy core spins: measured on 2 cores, a query took
    # a median of 3.4 s to serve with 2 threads while other jobs ran, and 0.68 s with 1.
    env.setdefault("OMP_NUM_THREADS", "1")
    # AdamW's moments stored with each version are read only by a learner that restarts or rebases, and the
    # demo never restarts a role nor resumes a run; kept, they tripled each version on disk (a 320-query
    # run's 12 versions took 38 GB: blob and checkout of 1.6 GB each). QRLOOP_DPO__KEEP_OPTIMIZER_STATE wins.
    env.setdefault("QRLOOP_DPO__KEEP_OPTIMIZER_STATE", "false")
    if learning_rate is not None:  # the demo's own default; QRLOOP_DPO__LEARNING_RATE in the environment wins
        env.setdefault("QRLOOP_DPO__LEARNING_RATE", str(learning_rate))
    if lora_r is not None:  # likewise: QRLOOP_DPO__LORA_R wins
        env.setdefault("QRLOOP_DPO__LORA_R", str(lora_r))
    return RunLayout(run_id, run_dir, env, settings, free_port())


def offline_policy_version(base: Settings) -> int | None:
    """The default store's offline policy (full build or warm start) *for the configured data set*: its
    ``production`` version when the offline phase published it for this data set, else the newest offline
    version tagged with this data set, else None. A policy warm-started on one catalog is never reused on
    another ("yoga mat" → "vice" on CrowdFlower with the Home Depot warm start)."""
    try:
        store = open_store(base)
    except Exception:  # no default store yet: nothing was published
        return None
    try:
        return offline_version_for(store, dataset_name(base))
    except Exception:
        return None
    finally:
        store.close()


def offline_version_for(store: PolicyStore, dataset: str) -> int | None:
    """``production`` if it is an offline policy trained on ``dataset``, else the newest such version."""

    def fits(version: PolicyVersion) -> bool:
        return version.tags.get("stage") == "offline" and version.tags.get("dataset") == dataset

    try:
        production = store.resolve("production")
        if fits(production):
            return production.id
    except UnknownAliasError:
        pass
    return next((v.id for v in store.list(newest_first=True) if fits(v)), None)


def ensure_starting_policy(base: Settings, console: Console, warm_start_steps: int) -> None:
    """Without an offline policy the loop would start from vanilla SmolLM2, which chats instead of rewriting;
    a short SFT warm start (once per machine, a few minutes) gives it the format first."""
    if warm_start_steps <= 0 or offline_policy_version(base) is not None:
        return
    console.print(
        f"[yellow]no offline policy for the data set {dataset_name(base)!r} published yet[/]: "
        f"a warm start first ({warm_start_steps} SFT steps on Q2Q pairs, once; "
        "`qrloop offline build` does the full phase)"
    )
    db.upgrade(base.db_url)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Bars(*columns, console=console) as bars:
        version = warm_start(base, steps=warm_start_steps, progress=bars)
    console.print(f"warm start published as version {version} ('production') in {base.db_url}")


def publish_starting_policy(run: RunLayout, base: Settings, start_dir: Path | None = None) -> int:
    """Version 1 of the run: ``start_dir`` if given, else the offline MiniELM when the default store has one,
    else the base SmolLM2."""
    offline = offline_policy_version(base) if start_dir is None else None
    dataset = dataset_name(base)
    if start_dir is not None:
        source_dir, base_model, tags = start_dir, str(start_dir), {"stage": "given"}
    elif offline is not None:
        home = open_store(base)
        try:
            production = home.get(offline)
            source_dir, base_model = home.load_dir(production), production.base_model
        finally:
            home.close()
        tags = {"stage": "offline", "from_version": str(offline)}
    else:
        source_dir, base_model = models.require_policy(base), "SmolLM2-135M-Instruct"
        tags = {"stage": "base"}
    tags["dataset"] = dataset  # what the run trains on: every later version of the run inherits it
    db.upgrade(run.settings.db_url)
    store = open_store(run.settings)
    version = store.publish(
        source_dir, base_model=base_model, tags=tags, actor="demo", reason="starting policy"
    )
    store.set_alias("production", version.id, reason="demo start", actor="demo")
    store.close()
    return version.id


@dataclass
class Progress:
    """What the demo has seen on the topics so far."""

    queries: int = 0
    pairs: int = 0
    versions: list[int] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    pair_versions: list[int | None] = field(default_factory=list)
    # Per scored query (ties included): the serving version and the mean reward of its two rewrites. This is
    # the policy's own reward; chosen/rejected rewards only describe the queries that made a pair.
    query_rewards: list[float] = field(default_factory=list)
    reward_versions: list[int | None] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    served_versions: list[int | None] = field(default_factory=list)
    # Per served query, in arrival order: rewrites that echo the query (0-2), whether the two are the same
    # text, whether the rewriter had to resample (rewriter.max_resamples): is exploration collapsing?
    served_echoes: list[int] = field(default_factory=list)
    served_same: list[bool] = field(default_factory=list)
    served_resampled: list[bool] = field(default_factory=list)
    served_texts: list[tuple[str, list[str]]] = field(default_factory=list)  # (query, its served rewrites)
    ties: int = 0
    prompts: list[str] = field(default_factory=list)
    chosen_texts: list[str] = field(default_factory=list)
    rejected_texts: list[str] = field(default_factory=list)
    run: RunLayout | None = None

    def table(self, total: int, batch: int) -> Table:
        elapsed = time.monotonic() - self.started
        rate = self.queries / elapsed if elapsed > 0 else 0.0
        eta = (total - self.queries) / rate if rate > 0 else float("nan")
        recent = self.query_rewards[-64:]
        mean = sum(recent) / len(recent) if recent else float("nan")
        first = self.query_rewards[:64]
        start = sum(first) / len(first) if first else float("nan")
        table = Table(title="qrloop demo", show_header=False)
        table.add_row("queries served", f"{self.queries}/{total}")
        table.add_row("preference pairs", f"{self.pairs}")
        table.add_row("DPO steps / versions", f"{len(self.versions)} (one per {batch} pairs)")
        table.add_row("serving version", f"{self.versions[-1] if self.versions else 1}")
        table.add_row("mean reward per query: first 64 / last 64", f"{start:.3f} / {mean:.3f}")
        table.add_row("elapsed / ETA", f"{elapsed:,.0f} s / {eta:,.0f} s")
        return table


def watch_topics(run: RunLayout) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=run.settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="qrloop-demo-monitor",
    )
    topics = run.settings.topics
    consumer.subscribe(
        [topics.query_events, topics.preference_pairs, topics.policy_versions, topics.query_outcomes]
    )
    return consumer


def absorb(progress: Progress, run: RunLayout, records: dict[TopicPartition, list[ConsumerRecord]]) -> None:
    topics = run.settings.topics
    for tp, messages in records.items():
        for message in messages:
            if tp.topic == topics.query_events:
                progress.queries += 1
                event = decode(QueryEvent, message.value)
                progress.served_versions.append(event.policy_version)
                progress.served_echoes.append(sum(is_echo(event.query, r.text) for r in event.rewrites))
                progress.served_same.append(same_text(event.rewrites[0].text, event.rewrites[1].text))
                progress.served_resampled.append(any(r.draw > 1 for r in event.rewrites))
                progress.served_texts.append((event.query, [r.text for r in event.rewrites]))
            elif tp.topic == topics.preference_pairs:
                pair = decode(PreferencePair, message.value)
                progress.pairs += 1
                progress.chosen.append(pair.chosen_reward)
                progress.rejected.append(pair.rejected_reward)
                progress.pair_versions.append(pair.policy_version)
                progress.prompts.append(pair.prompt)
                progress.chosen_texts.append(pair.chosen)
                progress.rejected_texts.append(pair.rejected)
            elif tp.topic == topics.query_outcomes:
                outcome = decode(QueryOutcome, message.value)
                progress.query_rewards.append(outcome.reward)
                progress.ties += outcome.tie
                progress.reward_versions.append(outcome.policy_version)
            elif tp.topic == topics.policy_versions:
                note = decode(PolicyAnnouncement, message.value)
                if note.kind == "version_published":
                    progress.versions.append(note.version)


def plot_smoothed(ax: Any, values: list[float], window: int, **style: Any) -> None:
    """Moving average of ``values`` over ``window``, each point drawn at the last value it covers."""
    if len(values) < window:
        smoothed = np.array(values)
    else:
        smoothed = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smoothed)) + (len(values) - len(smoothed)), smoothed, **style)


def plot_rewards(progress: Progress, path: Path, window: int = 5) -> Path:
    """Chosen and rejected rewards over the run, smoothed with a moving average (the paper's Figure 4)."""
    import matplotlib  # here: only the end of a demo draws, and the backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, per_query) = plt.subplots(2, 1, figsize=(8, 7))
    for values, label in ((progress.chosen, "chosen"), (progress.rejected, "rejected")):
        plot_smoothed(ax, values, window, label=label)
    ax.set_xlabel("preference pair (arrival order)")
    ax.set_ylabel(f"reward (moving average, {window})")
    ax.set_title("qrloop online DPO: rewards of chosen and rejected rewrites")
    ax.legend()
    ax.grid(alpha=0.3)
    wide = 4 * window  # per-query rewards vary with the query far more than with the policy
    plot_smoothed(per_query, progress.query_rewards, wide, color="tab:green")
    per_query.set_xlabel("scored query (arrival order, ties included)")
    per_query.set_ylabel(f"mean reward of both rewrites ({wide})")
    per_query.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ensure_broker(settings: Settings, console: Console) -> None:
    if check_kafka(settings).ok:
        return
    console.print("[yellow]no broker answering; starting the local one (scripts/kafka.sh start)[/]")
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "kafka.sh"), "start"], check=True)


def run_demo(
    base: Settings,
    queries: int,
    console: Console,
    run_id: str | None = None,
    start_dir: Path | None = None,
    warm_start_steps: int = 0,
    learning_rate: float | None = None,
    keep_topics: bool = False,
    lora_r: int | None = None,
) -> Progress:
    ensure_broker(base, console)
    data.prepare(base)
    if not models.is_policy_prepared(base):
        with console.status("preparing the policy model (once)..."):
            models.prepare_policy(base)
    if start_dir is None:
        ensure_starting_policy(base, console, warm_start_steps)
    run = make_run(base, run_id, learning_rate, lora_r)
    start_version = publish_starting_policy(run, base, start_dir)
    ensure_topics(run.settings)
    console.print(f"run [bold]{run.run_id}[/]: store {run.settings.db_url}, logs in {run.run_dir}")
    console.print(f"starting policy: version {start_version}")
    url = f"http://127.0.0.1:{run.rewriter_port}"
    roles = [
        Supervised("aggregator", ["aggregate"]),
        Supervised("learner", ["learn"]),
        Supervised("rewriter", ["serve", "--port", str(run.rewriter_port)]),
        Supervised("shoppers", ["shop", "--queries", str(queries), "--rewriter", url, "--wait-ready", "120"]),
    ]
    # Each role in its own session (Ctrl-C reaches the demo, which stops them); no restarts: the demo never
    # calls tick(), and a role that exits ends the demo with its log's name.
    supervisor = Supervisor(roles, spawn_qrloop(run.env, log_dir=run.run_dir))
    progress = Progress()
    batch = run.settings.dpo.batch_size
    consumer = watch_topics(run)
    try:
        with (
            supervisor,
            Live(progress.table(queries, batch), console=console, refresh_per_second=2) as live,
        ):
            quiet_since: float | None = None
            while True:
                absorb(progress, run, consumer.poll(timeout_ms=500))
                live.update(progress.table(queries, batch))
                for role in roles:
                    code = role.process.poll() if role.process else None
                    if code is not None and (role.name != "shoppers" or code != 0):
                        log_path = run.run_dir / f"{role.name}.log"
                        raise RuntimeError(f"the {role.name} exited with code {code}; see {log_path}")
                shoppers_done = roles[-1].process is not None and roles[-1].process.poll() is not None
                # Versions published, not steps: with dpo.publish_every = N only every N-th step publishes.
                expected_steps = progress.pairs // batch // run.settings.dpo.publish_every
                if shoppers_done and len(progress.versions) >= expected_steps:
                    # Let the aggregator close the last windows, then stop once nothing more arrives.
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > run.settings.streams.idle_advance_s + 8:
                        break
                else:
                    quiet_since = None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process was stopped[/]")
    finally:
        consumer.close()
    progress.run = run
    finish(run, progress, console)
    if not keep_topics:
        remove_topics(base, run, console)
    return progress


def remove_topics(base: Settings, run: RunLayout, console: Console) -> None:
    """A run's ~10 topics would otherwise stay on the broker for good; its store and logs stay on disk."""
    from kafka.errors import KafkaError

    from qrloop.topics import delete_own_run

    try:
        removed = delete_own_run(base, run.settings, run.run_id)
    except KafkaError as exc:  # the run's results are out already; leftover topics are only clutter
        console.print(f"[yellow]could not delete the run's topics ({exc}); `qrloop kafka clean-runs` will[/]")
        return
    console.print(f"deleted the run's {len(removed)} topics (--keep-topics keeps them, e.g. for replay)")


def finish(run: RunLayout, progress: Progress, console: Console) -> Path:
    store = open_store(run.settings)
    table = Table("version", "parent", "steps", "loss", "margin", "created")
    for version in sorted(store.list(), key=lambda v: v.id):
        m = version.metrics
        table.add_row(
            str(version.id),
            str(version.parent_id or "-"),
            str(version.train_steps),
            f"{m['loss']:.4f}" if "loss" in m else "-",
            f"{m['margin']:.4f}" if "margin" in m else "-",
            version.created_at.strftime("%H:%M:%S"),
        )
    store.close()
    console.print(table)
    console.print(reward_by_version(progress))
    console.print(exploration_by_version(progress))
    png = plot_rewards(progress, run.run_dir / "rewards.png")
    summary = summarise(progress, run.settings.dpo.batch_size)
    console.print(
        f"queries {progress.queries}, pairs {progress.pairs}, DPO steps {len(progress.versions)}; "
        f"mean reward per query, first vs last quarter: {summary['reward_first_quarter']:.3f} -> "
        f"{summary['reward_last_quarter']:.3f} ({summary['reward_gain_pct']:+.1f}%); chosen "
        f"{summary['chosen_first_quarter']:.3f} -> {summary['chosen_last_quarter']:.3f}; curve: {png}"
    )
    console.print(
        f"ties {summary['ties']}; served rewrites echoing the query, first vs last quarter: "
        f"{summary['echo_first_quarter']:.1%} -> {summary['echo_last_quarter']:.1%}; "
        f"pairs whose chosen rewrite is the query: {summary['chosen_is_echo']}"
    )
    spelling = spelling_evidence(run.settings, progress)
    if spelling is not None:
        summary["spelling"] = asdict(spelling)
        console.print(f"spelling: {spelling}")
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return png


def spelling_evidence(settings: Settings, progress: Progress) -> SpellingSignal | None:
    """What the run could learn about spelling (None where the data set ships no misspelling list): a run
    that served few corrections, or ranked few against a non-correction, had little to learn it from."""
    corrections = known_corrections(settings)
    if not corrections:
        return None
    pairs = zip(progress.prompts, progress.chosen_texts, progress.rejected_texts, strict=True)
    return spelling_signal(corrections, progress.served_texts, pairs)


def exploration_by_version(progress: Progress) -> Table:
    """Per serving version: how often served rewrites echo the query, differ from each other, needed a
    resample. A rising resample share means the policy itself is collapsing even where serving hides it."""
    rows: dict[int | None, list[tuple[int, bool, bool]]] = {}
    records = zip(
        progress.served_versions,
        progress.served_echoes,
        progress.served_same,
        progress.served_resampled,
        strict=True,
    )
    for version, echoes, same, resampled in records:
        rows.setdefault(version, []).append((echoes, same, resampled))
    table = Table(
        "served by version",
        "queries",
        "echo rate",
        "distinct rewrites",
        "resampled",
        title="exploration by serving version",
    )
    for version in sorted(rows, key=lambda v: -1 if v is None else v):
        got = rows[version]
        n = len(got)
        table.add_row(
            str(version),
            str(n),
            f"{sum(e for e, _, _ in got) / (2 * n):.1%}",
            f"{sum(not s for _, s, _ in got) / n:.1%}",
            f"{sum(r for _, _, r in got) / n:.1%}",
        )
    return table


def reward_by_version(progress: Progress) -> Table:
    """Mean reward per query grouped by the version that served it: does each new version earn more?"""
    by_version: dict[int | None, list[float]] = {}
    for version, reward in zip(progress.reward_versions, progress.query_rewards, strict=True):
        by_version.setdefault(version, []).append(reward)
    table = Table("served by version", "queries", "mean reward", title="reward per query by serving version")
    for version in sorted(by_version, key=lambda v: -1 if v is None else v):
        rewards = by_version[version]
        table.add_row(str(version), str(len(rewards)), f"{sum(rewards) / len(rewards):.4f}")
    return table


def summarise(progress: Progress, batch: int) -> dict[str, Any]:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    quarter = max(1, len(progress.chosen) // 4)
    per_query = max(1, len(progress.query_rewards) // 4)
    first, last = mean(progress.query_rewards[:per_query]), mean(progress.query_rewards[-per_query:])
    return {
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "reward_gain_pct": 100 * (last - first) / first if first else float("nan"),
        "queries": progress.queries,
        "pairs": progress.pairs,
        "versions": progress.versions,
        "chosen_first_quarter": mean(progress.chosen[:quarter]),
        "chosen_last_quarter": mean(progress.chosen[-quarter:]),
        "rejected_first_quarter": mean(progress.rejected[:quarter]),
        "rejected_last_quarter": mean(progress.rejected[-quarter:]),
        "batch_size": batch,
        "ties": progress.ties,
        "echo_first_quarter": echo_rate(progress.served_echoes[: max(1, len(progress.served_echoes) // 4)]),
        "echo_last_quarter": echo_rate(progress.served_echoes[-max(1, len(progress.served_echoes) // 4) :]),
        "chosen_is_echo": sum(
            is_echo(prompt, chosen)
            for prompt, chosen in zip(progress.prompts, progress.chosen_texts, strict=True)
        ),
    }


def echo_rate(echoes_per_query: list[int]) -> float:
    """Share of served rewrites (two per query) that echo the query."""
    return sum(echoes_per_query) / (2 * len(echoes_per_query)) if echoes_per_query else float("nan")
