"""Does RPO's term stop DPO's collapse onto the echo? A paired, offline experiment (issue #12, item 3)

    .venv/bin/python benchmarks/bench_collapse.py --run ~/.cache/qrloop/runs/<id> [--alphas 0,0.2,1]

The run's own traffic (``traffic.jsonl``: every query event, interaction and session end it served) is
attributed again with the aggregator's pure functions (``streams.replay.attribute``: the same windows, the
gain, the tie margin), which gives the run's pairs in the order their windows closed. From the run's first
version (its warm start, also the DPO reference) each weight α of ``--alphas`` (``dpo.rpo_alpha``: the chosen
rewrites' NLL per token added to the loss; 0 is plain DPO, what the run did) trains the *same* first
``--steps`` × 16 pairs with ``DPOLearnerCore`` (the learner's step, AdamW resumed from the version as the
learner does). Nothing in attribution or a DPO step is random, so the variants differ only by α.

Each trained policy and the start then serve the same held-out Home Depot queries and misspellings, with the
same seeds, exactly as ``bench_learning.py`` serves them (its ``evaluate_version``, without the Table 3
scoring), and are judged by what the learner is never paid by: human-label recall (original ∪ rewrites vs the
original alone), the greedy and sampled echo rates, spelling corrections, distinct rewrites, length. Also the
policy's own mass on the echo: mean log π(query | query) − log π_start(query | query) over the held-out
queries (teacher-forced, the learner's tokenisation), the collapse measured without sampling noise.
Printed side by side, with each variant's per-query paired bootstrap 95% CI against α = 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
import torch
from bench_learning import Figures, evaluate_version, figures, heldout_misspellings, labels_of
from bench_online import heldout_setup, load_average, run_settings

from learner import evaluate_online as ev
from learner.dpo import DPOLearnerCore, StepStats, completion_logprobs, tokenize_pairs
from learner.worker import training_triples
from policy_store import PolicyStore
from qrloop.events import PreferencePair
from qrloop.models import load_policy
from qrloop.prompting import end_of_turn
from qrloop.runs import open_store
from qrloop.serving import load_version
from qrloop.settings import Settings, get_settings
from streams.aggregator import make_relevance_fn
from streams.replay import attribute, parse, read_jsonl


@dataclass
class Variant:
    name: str
    steps: list[StepStats]
    figures: Figures
    echo_logprob: np.ndarray  # per held-out query: log π(echo | query)
    lists: list[str]  # greedy rewrites, for examples


def run_pairs(settings: Settings, run_dir: Path, m1: str) -> tuple[list[PreferencePair], int]:
    """The run's pairs as today's aggregator makes them, in the order their windows closed; and the ties.

    ``m1`` "cosine": score relevance with the untrained cosine fallback, as runs made before set-up trained
    M1 did (their aggregator.log says so); "installed": the M1 set-up installed."""
    if m1 == "cosine":  # a folder without M1 in it: RelevanceModel.load falls back to the cosine
        models = settings.models.model_copy(update={"relevance_dir": run_dir / "no-m1"})
        settings = settings.model_copy(update={"models": models})
    events = parse(read_jsonl(run_dir / "traffic.jsonl")).events
    attributed = attribute(events, make_relevance_fn(settings), settings)
    return attributed.pairs, attributed.ties


def trained_batches(db_url: str) -> list[list[str]]:
    """The pair ids each of the run's DPO steps trained, in step order, from the store's training records
    (``learner_training_records``; before migration 0004: ``learner_trained_pairs``, a step a version)."""
    engine = sa.create_engine(db_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        if "learner_training_records" in tables:
            query = "SELECT step, pair_id FROM learner_training_records ORDER BY step, id"
        elif "learner_trained_pairs" in tables:
            query = "SELECT version_id, pair_id FROM learner_trained_pairs ORDER BY version_id, trained_at"
        else:
            return []
        with engine.connect() as connection:
            rows = connection.execute(sa.text(query)).all()
    finally:
        engine.dispose()
    steps: dict[int, list[str]] = {}
    for step, pair_id in rows:
        steps.setdefault(int(step), []).append(str(pair_id))
    return [steps[k] for k in sorted(steps)]


def pick_batches(
    pairs: Sequence[PreferencePair], trained: Sequence[Sequence[str]], steps: int, size: int
) -> list[list[PreferencePair]]:
    """The run's own batches (``trained``), each pair as today's attribution makes it; an id that is a tie
    today is left out of its batch (counted). Without training records: consecutive batches of ``size`` in
    closing order."""
    by_id = {p.pair_id: p for p in pairs}
    if len(trained) >= steps:
        kept = [[by_id[i] for i in batch if i in by_id] for batch in trained[:steps]]
        dropped = sum(len(batch) for batch in trained[:steps]) - sum(len(batch) for batch in kept)
        print(f"batches: the run's own {steps} steps (training records); {dropped} of their pairs tie today")
        return kept
    print("batches: no training records for these steps; consecutive, in closing order")
    return [list(pairs[k * size : (k + 1) * size]) for k in range(steps)]


def train(
    settings: Settings,
    store: PolicyStore,
    start: int,
    batches: Sequence[Sequence[PreferencePair]],
    alpha: float,
    out: Path,
    learning_rate: float | None = None,
    echo_rejected: bool = False,
    lora_r: int = 0,
) -> list[StepStats]:
    lr = {"learning_rate": learning_rate} if learning_rate else {}
    tuned = settings.model_copy(
        update={"dpo": settings.dpo.model_copy(update={"rpo_alpha": alpha, "lora_r": lora_r, **lr})}
    )
    core = DPOLearnerCore.from_versions(tuned, store, policy_version=start, reference_version=start)
    stats = []
    for step, batch in enumerate(batches):
        triples = training_triples(batch, echo_rejected)
        stats.append(core.step(triples))
        s = stats[-1]
        print(
            f"  α={alpha:g}{' echo' if echo_rejected else ''}{f' lora r={lora_r}' if lora_r else ''} "
            f"step {step + 1} "
            f"({len(batch)} pairs + {len(triples) - len(batch)} echo): "
            f"loss {s.loss:.4f} margin {s.margin:+.4f} "
            f"chosen {s.chosen_reward:+.4f} rejected {s.rejected_reward:+.4f} acc {s.accuracy:.2f} "
            f"nll/token {s.nll:.3f} ({s.seconds:.0f} s)",
            flush=True,
        )
    core.save_merged(out)
    return stats


@torch.no_grad()
def echo_logprobs(model_dir: Path, queries: Sequence[str]) -> np.ndarray:
    """log π(query | query) per query: the echo's likelihood, teacher-forced as a DPO step scores it."""
    model, tokenizer = load_policy(model_dir)
    eos = end_of_turn(tokenizer, getattr(model, "generation_config", None))
    out = [
        float(completion_logprobs(model, tokenize_pairs(tokenizer, [(q, q, q)], 128, eos))[0])
        for q in queries
    ]
    return np.array(out)


ROWS = (
    ("recall ratio sampled", "{:.3f}"),
    ("recall ratio greedy", "{:.3f}"),
    ("relevant added sampled", "{:.0f}"),
    ("relevant added greedy", "{:.0f}"),
    ("echo greedy", "{:.1%}"),
    ("echo sampled", "{:.1%}"),
    ("spelling greedy", "{:.1%}"),
    ("spelling sampled", "{:.1%}"),
    ("spelling either", "{:.1%}"),
    ("distinct sampled / query", "{:.2f}"),
    ("length greedy (words)", "{:.2f}"),
    ("length sampled (words)", "{:.2f}"),
    ("grade sampled", "{:.2f}"),
)


def greedy_echo(variant: Variant, queries: Sequence[str]) -> np.ndarray:
    return np.array([float(ev.is_echo(q, g)) for q, g in zip(queries, variant.lists, strict=True)])


def print_table(variants: Sequence[Variant], queries: Sequence[str], seed: int) -> None:
    width = 12
    print(f"\n{'figure':<30}" + "".join(f"{v.name:>{width}}" for v in variants))
    for name, fmt in ROWS:
        print(
            f"{name:<30}"
            + "".join(f"{fmt.format(v.figures.pooled.get(name, float('nan'))):>{width}}" for v in variants)
        )
    start = variants[0].echo_logprob
    print(
        f"{'log π(echo) − start (mean)':<30}"
        + "".join(f"{(v.echo_logprob - start).mean():>+{width}.3f}" for v in variants)
    )
    for label, pick in (
        ("steps: loss first → last", lambda s: f"{s[0].loss:.3f}→{s[-1].loss:.3f}"),
        ("steps: accuracy mean", lambda s: f"{np.mean([x.accuracy for x in s]):.2f}"),
        ("steps: chosen reward last", lambda s: f"{s[-1].chosen_reward:+.3f}"),
        ("steps: rejected reward last", lambda s: f"{s[-1].rejected_reward:+.3f}"),
        ("steps: nll/token first → last", lambda s: f"{s[0].nll:.2f}→{s[-1].nll:.2f}"),
    ):
        print(f"{label:<30}" + "".join(f"{pick(v.steps) if v.steps else '-':>{width}}" for v in variants))
    base = next((v for v in variants if v.name == "α=0"), None)
    if base is None:
        return
    print("\npaired against α=0 (mean difference, bootstrap 95% CI), per held-out query:")
    for v in variants:
        if v is base:
            continue
        rows = {
            "recall ∪ sampled": (
                base.figures.per_query["recall ∪ sampled"],
                v.figures.per_query["recall ∪ sampled"],
            ),
            "recall ∪ greedy": (
                base.figures.per_query["recall ∪ greedy"],
                v.figures.per_query["recall ∪ greedy"],
            ),
            "greedy echo": (greedy_echo(base, queries), greedy_echo(v, queries)),
            "log π(echo)": (base.echo_logprob, v.echo_logprob),
        }
        for name, (a, b) in rows.items():
            s = ev.paired_stats(a, b, seed)
            print(f"  {v.name:<8} {name:<18} {s['mean']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}]")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--run", required=True, help="a demo run's directory (~/.cache/qrloop/runs/<id>)")
    root.add_argument("--alphas", default="0,0.2,1", help="rpo_alpha values to train, comma-separated")
    root.add_argument(
        "--m1",
        choices=("installed", "cosine"),
        default="installed",
        help="M1 the attribution scores with (cosine: as runs made before set-up trained M1)",
    )
    root.add_argument(
        "--learning-rate",
        type=float,
        help="DPO learning rate (default dpo.learning_rate; `qrloop demo`'s learner runs at 3e-5)",
    )
    root.add_argument(
        "--echo-rejected",
        action="store_true",
        help="also train α=0 with dpo.echo_rejected (a chosen rewrite that added something ≻ the echo)",
    )
    root.add_argument(
        "--lora",
        default="",
        help="also train α=0 as LoRA adapters (dpo.lora_r), comma-separated RANK@LEARNING_RATE, e.g. 16@3e-4",
    )
    root.add_argument("--skip-start", action="store_true", help="do not evaluate the start (saves a fifth)")
    root.add_argument("--steps", type=int, default=8, help="DPO steps of dpo.batch_size pairs each")
    root.add_argument("--start", type=int, default=0, help="version to start from (0: the store's first)")
    root.add_argument("--queries", type=int, default=60, help="labelled held-out Home Depot queries")
    root.add_argument("--spelling", type=int, default=60, help="held-out misspellings (0: skip)")
    root.add_argument("--profiles", type=int, default=20, help="(heldout_setup's judge; unused here)")
    root.add_argument("--m1-threshold", type=float, default=0.5, help="(heldout_setup's coverage rule)")
    root.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    root.add_argument("--seed", type=int, default=1234)
    return root


def main() -> None:
    args = parser().parse_args()
    started, cpu_started = time.perf_counter(), time.process_time()
    base = get_settings()
    run_dir = Path(args.run).expanduser()
    settings = run_settings(base, run_dir)
    store = open_store(settings)
    start = args.start or store.list(newest_first=False)[0].id
    pairs, ties = run_pairs(settings, run_dir, args.m1)
    need = args.steps * settings.dpo.batch_size
    print(
        f"== collapse: run {run_dir.name}, start v{start}; {len(pairs)} pairs, {ties} ties re-attributed "
        f"from traffic.jsonl; {args.steps} steps × {settings.dpo.batch_size}, β {settings.dpo.beta}, "
        f"lr {args.learning_rate or settings.dpo.learning_rate}; {load_average()}",
        flush=True,
    )
    if len(pairs) < need:
        raise SystemExit(f"{len(pairs)} pairs, {need} needed for {args.steps} steps")
    batches = pick_batches(pairs, trained_batches(settings.db_url), args.steps, settings.dpo.batch_size)
    setup = heldout_setup(base, args)
    queries = setup.queries
    labels = labels_of(setup.evaluator.catalog, queries)
    misspellings = heldout_misspellings(base, args.spelling, args.seed)
    print(
        f"{len(queries)} held-out queries, {len(misspellings)} held-out misspellings (seed {args.seed})",
        flush=True,
    )
    variants = []
    with tempfile.TemporaryDirectory(prefix="bench-collapse-") as tmp:
        dirs: list[tuple[str, Path, list[StepStats]]] = (
            [] if args.skip_start else [("start", store.load_dir(start), [])]
        )
        trainings = [
            (f"α={a:g}", a, False, 0, args.learning_rate)
            for a in (float(x) for x in args.alphas.split(",") if x)
        ]
        if args.echo_rejected:
            trainings.append(("echo", 0.0, True, 0, args.learning_rate))
        for spec in (s for s in args.lora.split(",") if s):
            rank, lr = spec.split("@")
            trainings.append((f"r{rank}@{lr}", 0.0, False, int(rank), float(lr)))
        for name, alpha, echo, rank, lr in trainings:
            out = Path(tmp) / name
            stats = train(settings, store, start, batches, alpha, out, lr, echo_rejected=echo, lora_r=rank)
            dirs.append((name, out, stats))
        for number, (name, path, steps) in enumerate(dirs):
            t0 = time.perf_counter()
            policy = load_version(path, number)
            run = evaluate_version(
                base, policy, number, queries, misspellings, setup.search, None, setup.hints
            )
            variants.append(
                Variant(
                    name,
                    steps,
                    figures(run, labels, misspellings),
                    echo_logprobs(path, queries),
                    [q.greedy for q in run.lists],
                )
            )
            print(f"evaluated {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    store.close()
    print_table(variants, queries, args.seed)
    examples = list(zip(queries, *(v.lists for v in variants), strict=True))[:8]
    print("\ngreedy rewrites (" + " | ".join(v.name for v in variants) + "):")
    for row in examples:
        print("  " + repr(row[0]) + " → " + " | ".join(repr(x) for x in row[1:]))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU; {load_average()}")


if __name__ == "__main__":
    main()
