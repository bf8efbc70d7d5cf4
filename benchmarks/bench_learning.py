"""Did the loop learn rewrites that find more of what people judged relevant? (issue #12, item 4)

    .venv/bin/python benchmarks/bench_learning.py --run ~/.cache/qrloop/runs/<id> [--queries 100]
    .venv/bin/python benchmarks/bench_learning.py --versions production,production   # the default store

Two versions of one store (``--run``: a demo run's own store, as ``bench_online.py table3`` finds it; without
it the default store), by default its first and last (``--versions A,B``: ids or aliases, the same one twice
to measure the noise floor), serve the same *held-out* queries (``qrloop.data.is_heldout``: never trained on)
of each data set in ``--datasets`` (default Home Depot and CrowdFlower, a catalog nobody tuned for). Each
version rewrites every query the way it is served (``Rewriter.serve``: two sampled rewrites, torch seeded per
query, the same seed for both versions) and greedily (one rewrite); each list is the search engine's top 10.

Reported side by side, first version vs last, with the per-query difference's paired bootstrap 95% CI:

- the paper's Table 3 (relevance, diversity, click, add-to-cart, purchase; the combined reward) and Table 4
  (coverage), scored exactly as ``bench_online.py table3`` scores them (its ``Evaluator``: M1, the click-model
  judge's analytic expectation over seeded profiles);
- human labels: recall of the products raters judged relevant (mapped relevance ≥ 0.75: Home Depot grade
  ≥ 2.5) in the original query's top 10 vs in the union with the rewrites' top 10 (sampled; greedy), the mean
  human grade of the labelled products each list shows, and how many labelled products it shows;
- the echo rate (rewrites that normalise to the query), distinct rewrites per query, mean length in words;
- spelling (where the data set ships a list of corrections, Home Depot's ``hd_query_spell_corrections.csv``):
  the share of its *held-out* misspelled queries that at least one rewrite corrects (the two served, best-of-N
  included; greedy).

``--first-serves KEY=VALUE`` and ``--last-serves KEY=VALUE`` (repeatable) override rewriter settings for
the first or the last version only: with ``--versions V,V`` it is the paired A/B of a serving choice on one
version (``--versions 1,1 --last-serves pick=complementary``; ``--last-serves samples=16``).

Nothing here is a reward the learner is paid by: human labels, known corrections and plain counts. The metric
functions are ``learner.evaluate_online`` (unit-tested on hand-made data).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_online import (
    METRICS,
    Evaluator,
    PolicyRun,
    QueryScores,
    gain,
    grade_lookup,
    heldout_setup,
    load_average,
    run_settings,
    serve_seeded,
)
from pydantic import ValidationError

from learner import evaluate_online as ev
from learner.offline.evaluate import generate_rewrites
from learner.offline.q2q import SPELLING_FILE, dataset_spelling_pairs
from policy_store import PolicyStore
from qrloop.cli.main import novelty_ranker
from qrloop.data import is_heldout, normalise_query, source_folder
from qrloop.prompting import Hints, user_message
from qrloop.runs import open_store
from qrloop.serving import LoadedPolicy, Ranker, Rewriter, load_stored_version
from qrloop.settings import RewriterSettings, Settings, get_settings


@dataclass
class QueryLists:
    """One version on one query: the original's top k, the sampled and greedy rewrites and their top k."""

    query: str
    original: list[str]
    sampled: list[str]
    sampled_products: list[list[str]]
    greedy: str
    greedy_products: list[str]


@dataclass
class VersionRun:
    version: int
    table3: PolicyRun
    lists: list[QueryLists] = field(default_factory=list)
    spelling_sampled: list[list[str]] = field(default_factory=list)
    spelling_greedy: list[list[str]] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process's CPU time: comparable across runs on a shared, loaded machine


@dataclass
class Labels:
    """Per held-out query (normalised): product → mapped relevance in [0, 1]; product → the source's grade."""

    relevance: dict[str, dict[str, float]]
    grade: dict[str, dict[str, float]]

    def relevant(self, query: str) -> set[str]:
        return ev.relevant_products(self.relevance.get(normalise_query(query), {}))

    def grades(self, query: str) -> dict[str, float]:
        return self.grade.get(normalise_query(query), {})


def labels_of(catalog: Any, queries: Sequence[str]) -> Labels:
    grades: dict[str, dict[str, float]] = {}
    for (query, pid), g in grade_lookup(catalog, queries).items():
        grades.setdefault(query, {})[pid] = g
    relevance = {normalise_query(q): catalog.labelled(q) for q in queries}
    return Labels(relevance, grades)


def heldout_misspellings(settings: Settings, n: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of the data set's known (misspelled, corrected) pairs whose misspelling is held out."""
    if n <= 0:
        return []
    table = dataset_spelling_pairs(settings)
    cases = sorted({(a, b) for a, b in zip(table["query_a"], table["query_b"], strict=True) if is_heldout(a)})
    cases = [(a, b) for a, b in cases if ev.corrects(a, b, b)]  # drop case-only "corrections"
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(cases), size=min(n, len(cases)), replace=False)) if cases else []
    return [cases[i] for i in picked]


def resolve_version(store: PolicyStore, spec: str) -> int:
    return int(spec) if spec.isdigit() else store.resolve(spec).id


def pick_two(store: PolicyStore, spec: str | None) -> tuple[int, int]:
    if spec:
        first, last = spec.split(",")
        return resolve_version(store, first), resolve_version(store, last)
    ids = [v.id for v in store.list(newest_first=False)]
    if not ids:
        raise SystemExit("the store holds no version: nothing to evaluate")
    return ids[0], ids[-1]


def with_rewriter(settings: Settings, overrides: Sequence[str]) -> Settings:
    """``settings`` with these ``KEY=VALUE`` rewriter settings replaced. The settings' own validation refuses
    an unknown key or a bad value (``Group`` forbids extra keys), so a typo is an error, not a default."""
    pairs = [o.partition("=") for o in overrides]
    if any(not key or not sep for key, sep, _ in pairs):
        raise SystemExit(f"a serving override is KEY=VALUE (a rewriter setting), not {list(overrides)}")
    update = {key.strip(): value.strip() for key, _, value in pairs}
    try:
        rewriter = RewriterSettings.model_validate({**settings.rewriter.model_dump(), **update})
    except ValidationError as error:
        raise SystemExit(f"serving overrides {update}: {error}") from error
    return settings.model_copy(update={"rewriter": rewriter})


def greedy(rewriter: Rewriter, queries: Sequence[str], max_new_tokens: int) -> list[str]:
    """One greedy rewrite per query, under the prompt the version is served with; one prompt per call, so no
    padding can change a rewrite."""
    policy = rewriter.policy
    messages = [user_message(q, rewriter.hints_for(policy, q)) for q in queries]
    texts, _lengths = generate_rewrites(
        policy.model, policy.tokenizer, messages, max_new_tokens=max_new_tokens, batch_size=1
    )
    return [" ".join(t.split()) for t in texts]


def sampled(rewriter: Rewriter, query: str, seed: int) -> list[str]:
    """The two rewrites the version serves for ``query`` (torch seeded). Served, searches included: with
    best-of-N the two are the ranker's pick of N, not the first two drawn."""
    return [r.text for r in serve_seeded(rewriter, query, seed).rewrites]


def evaluate_version(
    settings: Settings,
    policy: LoadedPolicy,
    version: int,
    queries: Sequence[str],
    misspellings: Sequence[tuple[str, str]],
    search: Callable[[str], list[str]],
    evaluator: Evaluator | None,
    hints: Hints | None = None,
    rank: Ranker | None = None,
) -> VersionRun:
    """``evaluator`` None: no Table 3 scores (only the human-label, echo and spelling figures; cheaper).
    ``hints``, ``rank``: as the rewriter's (a hinted version needs ``hints``; best-of-N, ``rank``)."""
    rewriter = Rewriter(policy, search, settings.rewriter, settings.seed, rank, hints=hints)
    k = settings.rewriter.top_k_products
    run = VersionRun(version, PolicyRun(version))
    started, cpu_started = time.perf_counter(), time.process_time()
    greedy_texts = greedy(rewriter, queries, settings.rewriter.max_new_tokens)
    for i, (query, best) in enumerate(zip(queries, greedy_texts, strict=True)):
        event = serve_seeded(rewriter, query, settings.seed + i)
        if evaluator is not None:
            run.table3.scores.append(evaluator.score(event))
        run.lists.append(
            QueryLists(
                query,
                list(event.original_products),
                [r.text for r in event.rewrites],
                [list(r.products) for r in event.rewrites],
                best,
                search(best)[:k] if best else [],
            )
        )
    wrong = [w for w, _right in misspellings]
    run.spelling_greedy = [[t] for t in greedy(rewriter, wrong, settings.rewriter.max_new_tokens)]
    run.spelling_sampled = [sampled(rewriter, w, settings.seed + 10_000 + i) for i, w in enumerate(wrong)]
    run.table3.seconds = time.perf_counter() - started
    run.cpu_seconds = time.process_time() - cpu_started
    return run


# ------------------------------------------------------------------------------------------------ figures


@dataclass
class Figures:
    """Per-query arrays (for paired CIs) and pooled figures of one version on one data set."""

    per_query: dict[str, np.ndarray]
    pooled: dict[str, float]


def figures(run: VersionRun, labels: Labels, misspellings: Sequence[tuple[str, str]]) -> Figures:
    scores: list[QueryScores] = run.table3.scores
    per_query = {m: np.array([s.metrics[m] for s in scores]) for m in METRICS}
    per_query["combined"] = run.table3.combined()
    per_query["coverage"] = np.array([float(s.coverage) for s in scores], dtype=np.float64)
    recall_sampled = [ev.recall(q.original, q.sampled_products, labels.relevant(q.query)) for q in run.lists]
    recall_greedy = [ev.recall(q.original, [q.greedy_products], labels.relevant(q.query)) for q in run.lists]
    judged = np.array([r.relevant > 0 for r in recall_sampled])
    per_query["recall ∪ sampled"] = np.array([r.union / max(r.relevant, 1) for r in recall_sampled])[judged]
    per_query["recall ∪ greedy"] = np.array([r.union / max(r.relevant, 1) for r in recall_greedy])[judged]
    s_sum, g_sum = ev.summarise_recall(recall_sampled), ev.summarise_recall(recall_greedy)
    shown_original = [ev.labelled_shown(q.original, labels.grades(q.query)) for q in run.lists]
    shown_rewrites = [
        ev.labelled_shown(p, labels.grades(q.query)) for q in run.lists for p in q.sampled_products
    ]
    shown_greedy = [ev.labelled_shown(q.greedy_products, labels.grades(q.query)) for q in run.lists]
    shown_union = [
        ev.labelled_shown([p for ps in [q.original, *q.sampled_products] for p in ps], labels.grades(q.query))
        for q in run.lists
    ]
    queries = [q.query for q in run.lists]
    pooled = {
        "queries with relevant labels": float(s_sum.queries),
        "recall original": s_sum.original,
        "recall ∪ sampled": s_sum.union,
        "recall ratio sampled": s_sum.ratio,
        "relevant added sampled": float(s_sum.added),
        "recall ∪ greedy": g_sum.union,
        "recall ratio greedy": g_sum.ratio,
        "relevant added greedy": float(g_sum.added),
        "grade original": ev.mean_grade(shown_original),
        "grade sampled": ev.mean_grade(shown_rewrites),
        "grade greedy": ev.mean_grade(shown_greedy),
        "labelled shown original": float(np.mean([s.labelled for s in shown_original])),
        "labelled shown sampled": float(np.mean([s.labelled for s in shown_rewrites])),
        "labelled shown greedy": float(np.mean([s.labelled for s in shown_greedy])),
        "labelled shown ∪ sampled": float(np.mean([s.labelled for s in shown_union])),
        "echo sampled": ev.echo_rate(queries, [q.sampled for q in run.lists]),
        "echo greedy": ev.echo_rate(queries, [[q.greedy] for q in run.lists]),
        "distinct sampled / query": ev.distinct_rewrites([q.sampled for q in run.lists]),
        "length sampled (words)": ev.mean_length([q.sampled for q in run.lists]),
        "length greedy (words)": ev.mean_length([[q.greedy] for q in run.lists]),
    }
    if misspellings:
        hits_s, n = ev.corrected_share(misspellings, run.spelling_sampled)
        hits_g, _ = ev.corrected_share(misspellings, run.spelling_greedy)
        both = [s + g for s, g in zip(run.spelling_sampled, run.spelling_greedy, strict=True)]
        hits_any, _ = ev.corrected_share(misspellings, both)
        pooled |= {
            "misspellings": float(n),
            "spelling sampled": hits_s / n,
            "spelling greedy": hits_g / n,
            "spelling either": hits_any / n,
        }
    return Figures(per_query, pooled)


def print_paired_rows(first: Figures, last: Figures, names: Sequence[str], seed: int) -> None:
    print(f"{'per query':<20} {'first':>8} {'last':>8} {'gain':>7}  last − first, paired bootstrap 95% CI")
    for name in names:
        a, b = first.per_query[name], last.per_query[name]
        if len(a) == 0:
            continue
        s = ev.paired_stats(a, b, seed)
        ci = f"{s['mean']:+.4f} [{s['low']:+.4f}, {s['high']:+.4f}]"
        print(
            f"{name:<20} {a.mean():>8.4f} {b.mean():>8.4f} {gain(float(a.mean()), float(b.mean())):>7}  {ci}"
        )


def print_pooled(first: Figures, last: Figures) -> None:
    print(f"\n{'pooled':<28} {'first':>8} {'last':>8}")
    for name, value in first.pooled.items():
        print(f"{name:<28} {value:>8.3f} {last.pooled[name]:>8.3f}")


def bench_dataset(args: argparse.Namespace, base: Settings, dataset: str) -> None:
    settings = base.model_copy(update={"dataset": dataset})
    run_dir = Path(args.run).expanduser() if args.run else None
    store = open_store(run_settings(base, run_dir) if run_dir else base)
    try:
        first, last = pick_two(store, args.versions)
        setup = heldout_setup(settings, args)
        queries = setup.queries
        labels = labels_of(setup.evaluator.catalog, queries)
        misspellings = heldout_misspellings(settings, args.spelling, args.seed)
        spelling_file = source_folder(settings) / SPELLING_FILE
        if not spelling_file.is_file():
            print(f"no spelling list at {spelling_file}: the spelling figures are skipped for {dataset}")
        print(
            f"\n== {dataset}: versions {first} → {last} of {run_dir or base.db_url} (M1 = {setup.m1_kind}) =="
        )
        print(
            f"{len(queries)} labelled held-out queries, {len(misspellings)} held-out misspellings "
            f"(seed {args.seed}); {load_average()}"
        )
        arms = [
            with_rewriter(settings, args.first_serves),
            with_rewriter(settings, args.last_serves),
        ]
        for name, arm in zip(("first", "last"), arms, strict=True):
            r = arm.rewriter
            print(f"{name} serves: samples {r.samples}, pick {r.pick}, temperature {r.temperature}")
        # Best-of-N as `qrloop serve` runs it (samples > 2): M1's novelty picks the two. One ranker (one M1)
        # for both arms: it does not depend on the rewriter settings.
        ranker = novelty_ranker(settings) if any(a.rewriter.samples > 2 for a in arms) else None
        served = [(first, arms[0]), (last, arms[1])]
        if served[0] == served[1]:
            # The same weights, settings and seeds: a second pass would repeat the first bit for bit.
            served = served[:1]
        runs = []
        for version, arm in served:
            runs.append(
                evaluate_version(
                    arm,
                    load_stored_version(store, store.get(version)),
                    version,
                    queries,
                    misspellings,
                    setup.search,
                    setup.evaluator,
                    setup.hints,
                    ranker if arm.rewriter.samples > 2 else None,
                )
            )
            done, n = runs[-1], len(queries) + len(misspellings)
            print(
                f"v{version}: {done.table3.seconds:.1f} s wall, {done.cpu_seconds:.1f} s CPU "
                f"({done.table3.seconds / n:.2f} s wall / query, held-out and misspelled)"
            )
        if len(runs) == 1:
            print("one version against itself: evaluated once; the paired differences are 0 by construction")
            runs.append(runs[0])
    finally:
        store.close()
    a, b = (figures(r, labels, misspellings) for r in runs)
    print("\nTable 3 / Table 4 (sampled rewrites, as served) and human-label recall")
    print_paired_rows(
        a, b, [*METRICS, "combined", "coverage", "recall ∪ sampled", "recall ∪ greedy"], args.seed
    )
    print_pooled(a, b)
    examples = [(p.query, p.greedy, q.greedy) for p, q in zip(runs[0].lists, runs[1].lists, strict=True)][:5]
    print(
        "\ngreedy rewrites (query → first | last): "
        + "; ".join(f"{q!r} → {x!r} | {y!r}" for q, x, y in examples)
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument(
        "--run", help="a demo run's directory (~/.cache/qrloop/runs/<id>); default: the default store"
    )
    root.add_argument("--versions", help="FIRST,LAST: ids or aliases (default: the store's first and last)")
    for which in ("first", "last"):
        root.add_argument(
            f"--{which}-serves",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"a rewriter setting for the {which} version only (repeatable), e.g. samples=16",
        )
    root.add_argument("--queries", type=int, default=100, help="labelled held-out queries per data set")
    root.add_argument("--spelling", type=int, default=100, help="held-out misspellings (0: skip)")
    root.add_argument("--datasets", default="homedepot,crowdflower")
    root.add_argument("--profiles", type=int, default=20, help="shopper profiles the expectations average")
    root.add_argument(
        "--m1-threshold", type=float, default=0.5, help="coverage: M1 score of a relevant product"
    )
    root.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    root.add_argument("--seed", type=int, default=1234)
    return root


def main() -> None:
    args = parser().parse_args()
    base = get_settings()
    started, cpu_started = time.perf_counter(), time.process_time()
    for dataset in args.datasets.split(","):
        bench_dataset(args, base, dataset)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"\ntotal {wall:.0f} s wall, {cpu:.0f} s CPU; {load_average()}")


if __name__ == "__main__":
    main()
