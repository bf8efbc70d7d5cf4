"""Figures of the online loop (issue #6, "Benchmark"), each sub-command measured side by side in one run.

    .venv/bin/python benchmarks/bench_online.py table3 --run ~/.cache/qrloop/runs/<id> [--queries 200]
    .venv/bin/python benchmarks/bench_online.py speed [--queries 20] [--agg-queries 100] [--repeats 3]
    .venv/bin/python benchmarks/bench_online.py latency --run ~/.cache/qrloop/runs/<id>

``table3`` — the paper's Table 3 (five online metrics) and Table 4 (product coverage) on held-out queries.
  Queries: a seeded sample of the catalog's *labelled held-out* queries (``qrloop.data.is_heldout``: the
  learner and the simulated shoppers never saw them). Policies: the run's starting version and its last one
  (from the run's own store; ``--versions FIRST,LAST`` to pick others). Each policy samples two rewrites per
  query through ``Rewriter.serve`` (temperature / top-p from settings) with the *same* torch seed per query
  for both policies, and retrieves the top 10 for the query and each rewrite. Per rewrite:
  relevance r = mean M1(query, product) (``qrloop.rewards.relevance``); diversity d against the original
  query's list; click / add2cart / purchase rates = the click-model judge's *analytic expected* counts
  (``ClickModelJudge.expected``, human label where raters judged the pair, else M1) divided by the list's
  length, averaged over a fixed seeded set of ``--profiles`` shopper profiles. No sampling of clicks: the
  expectation has no judge noise, so what differs between the rows is the policies (and their sampling).
  A query's figure is the mean of its two rewrites. The combined reward is the settings' weighted mean.
  Coverage (Table 4): distinct relevant products over both rewrites' lists, mean per query; relevant = the
  human label passes the data set's rule (``learner.offline.q2q.default_rule``: Home Depot grade ≥ 2.67),
  else, for unlabelled pairs, M1 ≥ ``--m1-threshold`` (0.5). Noise vs gain: a paired bootstrap 95% CI
  (10,000 resamples of the queries) and a paired t-test of the per-query combined-reward difference
  (last − first); the rewrite sampling itself is the remaining noise, which is why both policies share the
  per-query seed.

``speed`` — (a) the rewriter: ``Rewriter.serve`` (two sampled rewrites in one ``generate`` with logits for
  the log-probabilities, a resample when the two coincide, and three searches) against bare
  ``model.generate(num_return_sequences=2)`` on the same prompts with the same seed, alternating which runs
  first per query; medians over ``--queries`` after two untimed warm-ups. Policy: the default store's
  ``production`` (or ``--policy-dir``). Beside them, best-of-N serving (``--best-of 8``: N rewrites a
  round, N searches, M1's novelty ranks them; what ``qrloop serve`` does with ``rewriter.samples = N``).
  (b) the aggregator: the real Faust worker (``qrloop aggregate``, a subprocess on unique topics) against a
  raw kafka-python consume + produce pass-through (also a subprocess) of the *same* messages on the same
  broker. ``--agg-queries`` synthetic query events (real training queries, real search results, feedback
  from the click-model judge through ``ShopperTraffic``, as the shoppers emit it: impressions, clicks, carts,
  purchases, jittered, 2% duplicated, plus each query's ``SessionEnd``) are produced after both consumers are
  warm (the Faust worker has scored a few warm-up queries, so M1 is loaded). Time: from the first produce
  until the last query's ``QueryOutcome`` is on its topic (every scored query emits one, ties included),
  vs until the pass-through has re-produced the last message. Feedback messages per second are compared.
  The Faust worker runs three ways, each on its own topics and consumer group: M1 encoding each product on
  first sight (``models.use_catalog_embeddings`` false), M1 with the precomputed catalog embeddings (``qrloop
  models embed-catalog``; the row is left out when none are built), and no M1 at all (this file's
  ``_aggregate_unscored``: the same agents, a relevance that is a hash of the product id), so Faust's own
  cost is told from scoring. ``--repeats`` runs of every row (order alternating per repeat), medians.
  The pure path also runs in-process on the same messages (decode, ``streams.attribution`` join / dedupe /
  score with a fresh M1 cache, encode the outcome), matrix off and on.
  The DPO step is *not* re-measured here: ``benchmarks/bench_dpo.py`` prints ours vs TRL's
  ``training_step`` vs LoRA vs the fp32 matmul bound on the same batch.

``latency`` — from a finished demo run's artefacts: for each DPO step (version v ≥ 2 of the run's store),
  the 16th pair is the message just before the offset stored with v on the run's preference-pairs topic
  (``<topic>.<run id>``, see ``qrloop.cli.demo.make_run``); its Kafka timestamp is the start. The ends: the
  learner's "DPO step N started" log line (what the pair waited for before its step: the reference terms
  still to compute), the version's ``alias_moved`` announcement on the policy-versions topic, the rewriter's
  "now serves version v" log line (the swap itself), and the first QueryEvent on the query-events topic with
  that ``policy_version`` (which also waits for the next shopper to arrive); the announcement and the first
  query also as multiples of the step's own time (the learner's "DPO step N: … (X s)" line). Median and max
  over the steps.

The machine is shared (2 cores): ``--threads`` (default 1) sets torch's threads, and the load average is
printed before and after every sub-command; timings move with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from learner.evaluate_online import paired_ratio_stats, paired_stats
from qrloop.cli.demo import run_settings
from qrloop.cli.supervisor import Spawner, Supervised, Supervisor, spawn_command, spawn_qrloop
from qrloop.prompting import Hints
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import Settings, get_settings
from qrloop.topics import make_producer

if TYPE_CHECKING:
    from qrloop.serving import LoadedPolicy

METRICS = ("relevance", "diversity", "click", "add2cart", "purchase")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------------- table3


@dataclass
class QueryScores:
    """One policy on one query: the mean of its two rewrites' metrics, and its coverage."""

    metrics: dict[str, float]
    combined: float
    coverage: int
    rewrites: tuple[str, str]


@dataclass
class PolicyRun:
    version: int | str  # a store version, or a name (the offline sub-command's "T/P", ...)
    scores: list[QueryScores] = field(default_factory=list)
    seconds: float = 0.0
    serve_seconds: list[float] = field(default_factory=list)  # per query: the rewriter alone, no scoring

    def mean(self, name: str) -> float:
        return float(np.mean([s.metrics[name] for s in self.scores]))

    def combined(self) -> np.ndarray:
        return np.array([s.combined for s in self.scores])

    def coverage(self) -> float:
        return float(np.mean([s.coverage for s in self.scores]))


def sample_heldout(catalog: Any, n: int, seed: int) -> list[str]:
    """A seeded sample of labelled held-out queries (never trained on), in a fixed order."""
    from qrloop.data import is_heldout

    heldout = catalog.dataset.heldout_queries
    labelled = heldout[heldout["n_labels"] > 0]
    queries = sorted(str(q) for q in labelled["query"])
    rng = np.random.default_rng(seed)
    chosen = [queries[i] for i in sorted(rng.choice(len(queries), size=min(n, len(queries)), replace=False))]
    assert all(is_heldout(q) for q in chosen), "the split rule and the prepared split disagree"
    return chosen


def grade_lookup(catalog: Any, queries: Sequence[str]) -> dict[tuple[str, str], float]:
    """(normalised query, product) → the data set's own grade, for the sampled queries."""
    from qrloop.data import normalise_query

    ds = catalog.dataset
    wanted = {normalise_query(q) for q in queries}
    q = ds.queries[ds.queries["query"].map(normalise_query).isin(wanted)][["query_id", "query"]]
    labels = ds.labels.merge(q, on="query_id")
    return {
        (normalise_query(qq), str(p)): float(g)
        for qq, p, g in zip(labels["query"], labels["product_id"], labels["grade"], strict=True)
    }


def relevance_rule(
    catalog: Any, grades: dict[tuple[str, str], float], m1: Any, m1_threshold: float
) -> Callable[[str], Any]:
    """query → (product id → relevant?) with the data set's label rule, else M1 ≥ threshold."""
    from learner.offline.q2q import default_rule
    from qrloop.data import normalise_query

    min_grade, min_relevance = default_rule(catalog.dataset.name)

    def for_query(query: str) -> Callable[[str], bool]:
        key = normalise_query(query)

        def relevant(pid: str) -> bool:
            if min_grade is not None and (key, pid) in grades:
                return grades[(key, pid)] >= min_grade - 1e-6
            label = catalog.grade(query, pid)
            if label is not None and min_relevance is not None:
                return label >= min_relevance - 1e-6
            return float(m1.score(query, [catalog.text(pid)])[0]) >= m1_threshold

        return relevant

    return for_query


@dataclass
class Evaluator:
    """Scores one served QueryEvent with M1, the analytic click model and the profiles."""

    settings: Settings
    catalog: Any
    m1: Any
    judge: Any
    profiles: list[Any]
    relevant_for: Callable[[str], Callable[[str], bool]]

    def rewrite_metrics(self, query: str, original: list[str], products: list[str]) -> dict[str, float]:
        from qrloop import rewards

        shown = self.catalog.products(products)
        scores = self.m1.score(query, [p.text for p in shown]).tolist() if shown else []
        expected = [self.judge.expected(profile, query, shown) for profile in self.profiles]
        n = len(products)
        return {
            "relevance": rewards.relevance(scores),
            "diversity": rewards.diversity(original, products),
            "click": float(np.mean([rewards.rate(e["clicks"], n) for e in expected])),
            "add2cart": float(np.mean([rewards.rate(e["add_to_carts"], n) for e in expected])),
            "purchase": float(np.mean([rewards.rate(e["purchases"], n) for e in expected])),
        }

    def score(self, event: Any) -> QueryScores:
        from qrloop import rewards

        lists = [list(r.products) for r in event.rewrites]
        per = [self.rewrite_metrics(event.query, list(event.original_products), ps) for ps in lists]
        combined = [rewards.RewardComponents(**m).combined(self.settings.rewards) for m in per]
        return QueryScores(
            metrics={name: float(np.mean([m[name] for m in per])) for name in METRICS},
            combined=float(np.mean(combined)),
            coverage=rewards.coverage(lists, self.relevant_for(event.query)),
            rewrites=(event.rewrites[0].text, event.rewrites[1].text),
        )


def serve_seeded(rewriter: Any, query: str, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return rewriter.serve(query, shopper_id="bench", session_id=f"bench-{seed}")


def evaluate_policy(
    settings: Settings,
    store: Any,
    version: int,
    queries: Sequence[str],
    search: Any,
    evaluator: Evaluator,
    hints: Hints | None = None,
) -> PolicyRun:
    from qrloop.serving import load_stored_version

    policy = load_stored_version(store, store.get(version))
    return evaluate_loaded(settings, policy, version, queries, search, evaluator, hints)


def evaluate_loaded(
    settings: Settings,
    policy: LoadedPolicy,
    name: int | str,
    queries: Sequence[str],
    search: Any,
    evaluator: Evaluator,
    hints: Hints | None = None,
) -> PolicyRun:
    """``hints``: what a hinted policy's prompt shows (without them a hinted policy is refused)."""
    from qrloop.serving import Rewriter

    rewriter = Rewriter(policy, search, settings.rewriter, settings.seed, hints=hints)
    run = PolicyRun(name)
    started = time.perf_counter()
    for i, query in enumerate(queries):
        serve_s, event = timed(lambda: serve_seeded(rewriter, query, settings.seed + i))  # noqa: B023
        run.serve_seconds.append(serve_s)
        run.scores.append(evaluator.score(event))
    run.seconds = time.perf_counter() - started
    return run


def pick_versions(store: Any, spec: str | None) -> tuple[int, int]:
    if spec:
        first, last = (int(x) for x in spec.split(","))
        return first, last
    ids = [v.id for v in store.list(newest_first=False)]
    if len(ids) < 2:
        raise SystemExit(f"the run's store holds {len(ids)} version(s): nothing to compare")
    return ids[0], ids[-1]


def gain(first: float, last: float) -> str:
    return f"{(last - first) / first * 100:+.1f}%" if first else "n/a"


def print_table3(runs: Sequence[PolicyRun]) -> None:
    first, last = runs
    print(f"\n{'policy':<12} {'relevance':>9} {'diversity':>9} {'click':>7} {'add2cart':>8} {'purchase':>8}")
    for run in runs:
        cells = " ".join(f"{run.mean(m):>{max(7, len(m))}.4f}" for m in METRICS)
        print(f"{'v' + str(run.version):<12} {cells}")
    gains = " ".join(f"{gain(first.mean(m), last.mean(m)):>{max(7, len(m))}}" for m in METRICS)
    print(f"{'gain':<12} {gains}")


def print_table4(runs: Sequence[PolicyRun]) -> None:
    first, last = runs
    print(f"\n{'policy':<12} {'coverage (relevant products / query, both rewrites)':>52}")
    for run in runs:
        print(f"{'v' + str(run.version):<12} {run.coverage():>52.3f}")
    print(f"{'gain':<12} {gain(first.coverage(), last.coverage()):>52}")


def print_paired(runs: Sequence[PolicyRun], seed: int) -> None:
    first, last = runs
    s = paired_stats(first.combined(), last.combined(), seed)
    print(
        f"\ncombined reward: v{first.version} {first.combined().mean():.4f}, v{last.version} "
        f"{last.combined().mean():.4f}; per-query difference {s['mean']:+.4f}, paired bootstrap 95% CI "
        f"[{s['low']:+.4f}, {s['high']:+.4f}], paired t-test p = {s['p']:.3f}"
    )
    verdict = "a gain" if s["low"] > 0 else "a loss" if s["high"] < 0 else "not distinguishable from noise"
    print(f"→ {verdict} at 95% over {len(first.scores)} queries")
    same = sum(a.rewrites == b.rewrites for a, b in zip(first.scores, last.scores, strict=True))
    print(f"queries whose two rewrites are identical under both policies (same seed): {same}")


@dataclass
class HeldoutSetup:
    """What ``table3`` and ``offline`` share: the held-out queries, the scorer and the search engine."""

    queries: list[str]
    evaluator: Evaluator
    search: Any
    m1_kind: str
    catalog_texts: list[str]  # the products' texts and the training queries: never a held-out query
    hints: Hints  # what a hinted policy's prompt shows, from the same engine and catalog


def heldout_setup(settings: Settings, args: argparse.Namespace) -> HeldoutSetup:
    from qrloop.catalog import Catalog
    from qrloop.relevance import RelevanceModel
    from simulators.judge import ClickModelJudge, labelled_or_model
    from simulators.profiles import ProfilePool
    from simulators.search import SearchEngine

    catalog = Catalog.open(settings)
    queries = sample_heldout(catalog, args.queries, args.seed)
    m1 = RelevanceModel.load(settings)
    set_threads(args.threads)  # after M1: its loader applies the settings' own thread count
    judge = ClickModelJudge(labelled_or_model(catalog, m1.score))
    pool = ProfilePool(args.seed, args.profiles, list(catalog.brands())[:50])
    rule = relevance_rule(catalog, grade_lookup(catalog, queries), m1, args.m1_threshold)
    evaluator = Evaluator(settings, catalog, m1, judge, pool.profiles, rule)
    engine = SearchEngine.open(settings, dataset=catalog.dataset)
    texts = [*catalog.dataset.products["text"], *catalog.dataset.train_queries["query"]]
    hints = catalog.hints(engine.search)
    return HeldoutSetup(list(queries), evaluator, engine.search, m1.kind, texts, hints)


def cmd_table3(args: argparse.Namespace) -> None:
    settings = get_settings()
    run_dir = Path(args.run).expanduser()
    store = open_store(run_settings(settings, run_dir))
    versions = pick_versions(store, args.versions)
    setup = heldout_setup(settings, args)
    queries, m1_kind = setup.queries, setup.m1_kind
    print(f"== table3: run {run_dir.name}, versions {versions[0]} → {versions[1]} (M1 = {m1_kind}) ==")
    print(
        f"{len(queries)} labelled held-out queries (seed {args.seed}), {args.profiles} profiles, "
        f"temperature {settings.rewriter.temperature}, top-p {settings.rewriter.top_p}, "
        f"top-{settings.rewriter.top_k_products}"
    )
    print(load_average())
    runs = []
    for version in versions:
        runs.append(
            evaluate_policy(settings, store, version, queries, setup.search, setup.evaluator, setup.hints)
        )
        print(f"v{version}: {runs[-1].seconds:.1f} s ({runs[-1].seconds / len(queries):.2f} s / query)")
    print_table3(runs)
    print_table4(runs)
    print_paired(runs, args.seed)
    print(load_average())
    store.close()


def cmd_offline(args: argparse.Namespace) -> None:
    """The online reward of the offline phase's models (issue #8): each HF directory in ``--dirs`` serves the
    same held-out queries with the same seeds, scored exactly as ``table3`` scores versions."""
    settings = get_settings()
    offline = settings.cache_dir / "offline"
    named = [item.split("=", 1) for item in args.dirs.split(",")]
    restricted = set(args.catalog_vocabulary.split(",")) if args.catalog_vocabulary else set()
    setup = heldout_setup(settings, args)
    queries = setup.queries
    print(f"== offline models online: {len(queries)} labelled held-out queries (seed {args.seed}) ==")
    print(load_average())
    print(
        f"\n{'model':<8} {'relevance':>9} {'diversity':>9} {'click':>7} {'add2cart':>8} {'purchase':>8}"
        f" {'combined':>8} {'coverage':>8} {'s/query':>7} {'serve ms':>8}"
    )
    from qrloop.serving import load_version

    runs = []
    for name, path in named:
        folder = Path(path).expanduser()
        policy = load_version(folder if folder.is_absolute() else offline / folder, None)
        if name in restricted:
            restrict_to_catalog(policy, setup.catalog_texts)
        run = evaluate_loaded(settings, policy, name, queries, setup.search, setup.evaluator, setup.hints)
        cells = " ".join(f"{run.mean(m):>{max(7, len(m))}.4f}" for m in METRICS)
        print(
            f"{name:<8} {cells} {run.combined().mean():>8.4f} {run.coverage():>8.2f}"
            f" {run.seconds / len(queries):>7.2f} {statistics.median(run.serve_seconds) * 1000:>8.0f}"
        )
        runs.append(run)
    print_against_reference(runs, args.seed)
    print(load_average())


def restrict_to_catalog(policy: LoadedPolicy, texts: Sequence[str]) -> None:
    """Serve ``policy`` over the tokens of the catalog's texts and the training queries only."""
    from qrloop.vocabulary import output_vocabulary, restrict_output_vocabulary

    keep = output_vocabulary(policy.tokenizer, texts)
    restrict_output_vocabulary(policy.model, keep)
    print(f"  (output vocabulary: {len(keep):,} of {len(policy.tokenizer):,} tokens)")


def print_against_reference(runs: Sequence[PolicyRun], seed: int) -> None:
    """Each model's combined reward against the first's, paired per query: the relative difference with
    its bootstrap 95% CI (issue #12 item 6 asks for "within 5% of the teacher's"), and the absolute one."""
    reference, *others = runs
    for run in others:
        rel = paired_ratio_stats(reference.combined(), run.combined(), seed)
        diff = paired_stats(reference.combined(), run.combined(), seed)
        print(
            f"{run.version} vs {reference.version}: combined {rel['ratio']:+.1%} "
            f"(paired bootstrap 95% CI [{rel['low']:+.1%}, {rel['high']:+.1%}]); per query "
            f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}], paired t-test "
            f"p = {diff['p']:.3f}; serving time (median per query) "
            f"{statistics.median(run.serve_seconds) / statistics.median(reference.serve_seconds):.2f}×"
        )


# -------------------------------------------------------------------------------------------------- speed


def production_policy(settings: Settings, policy_dir: str | None) -> LoadedPolicy:
    """``--policy-dir`` if given, else what the store's ``production`` alias serves (of either kind)."""
    from qrloop.serving import load_stored_version, load_version

    if policy_dir:
        return load_version(Path(policy_dir).expanduser(), None)
    store = open_store(settings)
    try:
        return load_stored_version(store, store.resolve("production"))
    finally:
        store.close()


def bare_generate(policy: Any, query: str, config: Any, n: int = 2) -> list[str]:
    """``n`` sampled rewrites from one plain ``generate`` call: no logits, resampling or searches."""
    import torch

    from qrloop.prompting import build_prompt

    tokenizer = policy.tokenizer
    inputs = tokenizer(build_prompt(tokenizer, query), return_tensors="pt")
    with torch.no_grad():
        out = policy.model.generate(
            **inputs,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
        )
    return list(tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def bench_rewriter(settings: Settings, policy_dir: str | None, n: int, seed: int, best_of: int) -> None:
    import torch

    from qrloop.catalog import Catalog
    from qrloop.cli.main import novelty_ranker
    from qrloop.data import normalise_query as normalise
    from qrloop.serving import Rewriter
    from simulators.search import SearchEngine
    from simulators.shoppers import training_queries

    policy = production_policy(settings, policy_dir)
    catalog = Catalog.open(settings)
    engine = SearchEngine.open(settings, dataset=catalog.dataset)
    hints = catalog.hints(engine.search)  # a hinted policy pays for its words, as `qrloop serve` does
    rewriter = Rewriter(policy, engine.search, settings.rewriter, seed, hints=hints)
    ranked = None
    if best_of > 2:  # what `qrloop serve` runs with rewriter.samples = best_of
        config = settings.rewriter.model_copy(update={"samples": best_of})
        ranked = Rewriter(policy, engine.search, config, seed, novelty_ranker(settings), hints=hints)
    pool = [q for _, q in training_queries(catalog, 5)]
    queries = [pool[i] for i in np.random.default_rng(seed).choice(len(pool), size=n + 2, replace=False)]
    serve_s: list[float] = []
    bare_s: list[float] = []
    search_s: list[float] = []
    best_s: list[float] = []
    one_draw: list[float] = []  # serve / bare of the same query, where serve drew once as bare does
    resampled = 0
    for i, query in enumerate(queries):

        def serve(q: str = query, s: int = seed + i, r: Any = rewriter) -> Any:
            return serve_seeded(r, q, s)

        def bare(q: str = query, s: int = seed + i) -> list[str]:
            torch.manual_seed(s)
            return bare_generate(rewriter.policy, q, settings.rewriter)

        order = [(serve_s, serve), (bare_s, bare)] if i % 2 == 0 else [(bare_s, bare), (serve_s, serve)]
        if ranked is not None:
            order.insert(i % 3, (best_s, partial(serve, r=ranked)))
        results = [(sink, *timed(fn)) for sink, fn in order]
        if i < 2:
            continue  # warm-up
        for sink, seconds, _ in results:
            sink.append(seconds)
        texts = next(r for s, _, r in results if s is bare_s)
        resampled += normalise(texts[0]) == normalise(texts[1])
        event = next(r for s, _, r in results if s is serve_s)
        if max(rewrite.draw for rewrite in event.rewrites) == 1:  # served from the first draw, as bare's
            one_draw.append(serve_s[-1] / bare_s[-1])

        def search(q: str = query) -> list[list[str]]:
            return [engine.search(x) for x in (q, q, q)]

        search_s.append(timed(search)[0])
    print(
        f"\n== (a) rewriter, policy {policy_dir or 'production'} (version {policy.version}), "
        f"{n} training queries, medians =="
    )
    print(f"{'path':<46} {'median ms':>10} {'p90 ms':>8}")
    rows = [
        ("Rewriter.serve (2 rewrites + logprobs + search)", serve_s),
        ("bare generate(num_return_sequences=2)", bare_s),
        ("3 searches alone", search_s),
        (f"best-of-{best_of} serve (+ N searches + M1 novelty)", best_s),
    ]
    for name, values in rows[:3] if ranked is None else rows:
        print(f"{name:<46} {median(values) * 1000:>10.1f} {np.percentile(values, 90) * 1000:>8.1f}")
    print(
        f"serve / bare: {median(serve_s) / median(bare_s):.2f}x; queries where the two samples coincided "
        f"(serve resamples once): {resampled}/{n}"
    )
    # Serve draws again when a sample echoes the query or repeats the other (issue #12's guard), so part of
    # the ratio above is a second generate() on some queries, not overhead: the paired ratio of the queries
    # served from one draw (the same seed, the same samples as bare) is the serving path's own cost.
    if one_draw:
        print(
            f"serve / bare, paired, on the {len(one_draw)}/{n} queries served from one draw: median "
            f"{median(one_draw):.3f}x (min {min(one_draw):.3f}x, max {max(one_draw):.3f}x); the other "
            f"{n - len(one_draw)} drew again (an echo or two equal samples)"
        )
    if ranked is not None:
        print(f"best-of-{best_of} serve / serve: {median(best_s) / median(serve_s):.2f}x")


@dataclass
class Traffic:
    """Synthetic query events and their feedback, as the shoppers process would send them."""

    events: list[Any]
    feedback: list[list[Any]]  # per event: interactions then its SessionEnd

    @property
    def n_feedback(self) -> int:
        return sum(len(f) for f in self.feedback)

    def messages(self) -> Iterable[tuple[str, bytes, bytes]]:
        """(which topic: 'q' or 'i', key, value) in the order the shoppers would send them."""
        from qrloop.events import encode

        for event, feedback in zip(self.events, self.feedback, strict=True):
            key = event.event_id.encode()
            yield "q", key, encode(event)
            for item in feedback:
                yield "i", key, encode(item)


def make_traffic(settings: Settings, catalog: Any, judge: Any, n: int, seed: int) -> Traffic:
    from datetime import UTC

    from qrloop.events import QueryEvent, Rewrite
    from simulators.driver import feedback_events, lists_of
    from simulators.search import SearchEngine
    from simulators.shoppers import ShopperTraffic

    engine = SearchEngine.open(settings, dataset=catalog.dataset)
    traffic = ShopperTraffic(settings, catalog, judge, seed=seed)
    events, feedback = [], []
    for i in range(n):
        _, query, profile = traffic.next_query()
        words = query.split()
        texts = (query.lower(), " ".join(words[:-1]) or query) if len(words) > 1 else (query, f"{query} set")
        event = QueryEvent(
            event_id=str(uuid.uuid4()),
            event_time=datetime.now(UTC),
            shopper_id=profile.shopper_id,
            session_id=f"bench-{i}",
            query=query,
            policy_version=1,
            original_products=engine.search(query),
            rewrites=[
                Rewrite(rewrite_id=f"r{j + 1}", text=t, logprob=-1.0, products=engine.search(t))
                for j, t in enumerate(texts)
            ],
        )
        interactions, end = feedback_events(event, traffic.interactions(profile, query, lists_of(event)))
        events.append(event)
        feedback.append([*interactions, end])
    return Traffic(events, feedback)


def worker_env(settings: Settings, threads: int) -> dict[str, str]:
    return run_env(settings) | {"QRLOOP_MODELS__TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def tail_consumer(bootstrap: str, topic: str, partitions: int) -> Any:
    """A consumer positioned at the end of ``topic``: it sees only what is produced from now on."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for part in parts:
        consumer.position(part)  # resolve the end offset now, before anything is produced
    return consumer


def wait_for(consumer: Any, done: Callable[[Any], bool], timeout_s: float, alive: Callable[[], bool]) -> bool:
    """Poll until ``done(record)`` has returned True for the last needed record; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the worker under test died; see its log")
        for records in consumer.poll(timeout_ms=100).values():
            for record in records:
                if done(record):
                    return True
    return False


def produce(producer: Any, topics: dict[str, str], messages: Iterable[tuple[str, bytes, bytes]]) -> None:
    for which, key, value in messages:
        producer.send(topics[which], key=key, value=value)
    producer.flush()


def outcome_counter(ids: set[str]) -> Callable[[Any], bool]:
    from qrloop.events import QueryOutcome, decode

    def done(record: Any) -> bool:
        ids.discard(decode(QueryOutcome, record.value).query_event_id)
        return not ids

    return done


def count_to(n: int) -> Callable[[Any], bool]:
    seen = [0]

    def done(_record: Any) -> bool:
        seen[0] += 1
        return seen[0] >= n

    return done


@dataclass(frozen=True)
class FaustVariant:
    """One way of running the Faust worker: the real ``qrloop aggregate`` with the catalog matrix on or off,
    or this file's ``_aggregate_unscored`` (the same agents, a constant-cost relevance instead of M1)."""

    label: str
    scoring: bool
    matrix: bool = False
    one_by_one: bool = False  # each record its own changelog write and produce request (before batching)

    def spawn(self, settings: Settings, threads: int, tmp: Path) -> tuple[Supervised, Spawner]:
        env = worker_env(settings, threads) | {
            "QRLOOP_MODELS__USE_CATALOG_EMBEDDINGS": "true" if self.matrix else "false"
        }
        if self.one_by_one:
            env |= {"QRLOOP_STREAMS__BATCH_MAX": "1", "QRLOOP_STREAMS__PRODUCER_LINGER_S": "0"}
        if self.scoring:
            return Supervised("aggregator", ["aggregate"]), spawn_qrloop(env, log_dir=tmp)
        worker = Supervised("aggregator-unscored", ["_aggregate_unscored"])
        return worker, spawn_command([sys.executable, __file__], env, log_dir=tmp)


def time_faust(
    settings: Settings, variant: FaustVariant, warm: Traffic, measured: Traffic, threads: int, tmp: Path
) -> float:
    bootstrap, t = settings.kafka.bootstrap_servers, settings.topics
    topics = {"q": t.query_events, "i": t.interactions}
    worker, spawn = variant.spawn(settings, threads, tmp)
    supervisor = Supervisor([worker], spawn, stop_deadline_s=60)
    supervisor.start()
    producer = make_producer(settings, linger_ms=5)
    outcomes = tail_consumer(bootstrap, t.query_outcomes, 1)
    try:
        produce(producer, topics, warm.messages())
        done = outcome_counter({e.event_id for e in warm.events})
        if not wait_for(outcomes, done, 300, worker.alive):
            raise RuntimeError("the aggregator did not score the warm-up queries in 300 s")
        started = time.perf_counter()
        produce(producer, topics, measured.messages())
        done = outcome_counter({e.event_id for e in measured.events})
        if not wait_for(outcomes, done, 600, worker.alive):
            raise RuntimeError("the aggregator did not score every measured query in 600 s")
        return time.perf_counter() - started
    finally:
        outcomes.close()
        producer.close()
        supervisor.stop()


def time_raw(settings: Settings, prefix: str, warm: Traffic, measured: Traffic, tmp: Path) -> float:
    from qrloop.topics import ensure_topics

    bootstrap, partitions = settings.kafka.bootstrap_servers, settings.topics.partitions
    topics = {"q": f"{prefix}.raw-q", "i": f"{prefix}.raw-i"}
    out_topic = f"{prefix}.raw-out"
    ensure_topics(bootstrap, {topics["q"]: partitions, topics["i"]: partitions, out_topic: partitions})
    argv = ["_passthrough", "--bootstrap", bootstrap, "--out", out_topic, topics["q"], topics["i"]]
    worker = Supervised("passthrough", argv)
    spawn = spawn_command([sys.executable, __file__], log_dir=tmp)
    supervisor = Supervisor([worker], spawn, stop_deadline_s=60)
    supervisor.start()
    producer = make_producer(settings, linger_ms=5)
    out = tail_consumer(bootstrap, out_topic, partitions)
    try:
        warm_n = len(warm.events) + warm.n_feedback
        produce(producer, topics, warm.messages())
        if not wait_for(out, count_to(warm_n), 120, worker.alive):
            raise RuntimeError("the pass-through did not copy the warm-up messages in 120 s")
        started = time.perf_counter()
        produce(producer, topics, measured.messages())
        if not wait_for(out, count_to(len(measured.events) + measured.n_feedback), 600, worker.alive):
            raise RuntimeError("the pass-through did not copy every measured message in 600 s")
        return time.perf_counter() - started
    finally:
        out.close()
        producer.close()
        supervisor.stop()


def time_pure(settings: Settings, warm: Traffic, measured: Traffic, matrix: bool) -> float:
    """The aggregator's decisions without Kafka or Faust: decode, join, dedupe, M1, score, outcome (the
    queries of each ``streams.batch_max`` events encoded together first, as the worker's query agent does)."""
    from qrloop.events import Interaction, QueryEvent, decode, decode_feedback, encode
    from streams import attribution
    from streams.aggregator import make_relevance_fn

    models = settings.models.model_copy(update={"use_catalog_embeddings": matrix})
    settings = settings.model_copy(update={"models": models})
    relevance = make_relevance_fn(settings)  # a fresh M1 cache, as the worker's
    window_s, batch = settings.streams.attribution_window_s, settings.streams.batch_max

    def run(traffic: Traffic) -> None:
        for start in range(0, len(traffic.events), batch):
            events, feedback = traffic.events[start : start + batch], traffic.feedback[start : start + batch]
            # As the worker does with a batch of query events: their queries encoded together first.
            relevance.prepare([event.query for event in events])
            for event, items in zip(events, feedback, strict=True):
                score_one(event, items)

    def score_one(event: QueryEvent, feedback: Sequence[Any]) -> None:
        state = attribution.apply_query(attribution.new_state(), decode(QueryEvent, encode(event)), window_s)
        for raw in (encode(item) for item in feedback):
            item = decode_feedback(raw)
            if isinstance(item, Interaction):
                attribution.apply_interaction(state, item, window_s)
            else:
                attribution.apply_session_end(state, item)
        encode(attribution.outcome(state, attribution.score(state, relevance, settings.rewards)))

    run(warm)
    return timed(lambda: run(measured))[0]


def delete_topics(bootstrap: str, prefix: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        mine = [t for t in admin.list_topics() if prefix in t]  # the run's, its raw and Faust's internal ones
        if mine:
            admin.delete_topics(mine)
    except Exception as exc:  # the figures are out already; leftover topics are only clutter
        print(f"(could not delete the benchmark's topics: {exc})")
    finally:
        admin.close()


def bench_aggregator(settings: Settings, n: int, n_warm: int, threads: int, seed: int, repeats: int) -> None:
    from qrloop.catalog import Catalog
    from qrloop.catalog_embeddings import EMBED_COMMAND, embeddings_dir, read_meta
    from qrloop.relevance import RelevanceModel
    from simulators.judge import ClickModelJudge, labelled_or_model

    base = settings
    catalog = Catalog.open(settings)
    # The shoppers' judge only makes the traffic (the same for every row): the matrix makes it faster.
    judge = ClickModelJudge(labelled_or_model(catalog, RelevanceModel.load(settings, catalog).score))
    warm, measured = (make_traffic(settings, catalog, judge, k, seed + j) for j, k in enumerate((n_warm, n)))
    meta = read_meta(embeddings_dir(settings))
    variants = [FaustVariant("Faust + M1, products encoded on first sight (matrix off)", True)]
    if meta is None:
        print(f"(no catalog embeddings in {embeddings_dir(settings)}: `{EMBED_COMMAND}` builds them)")
    else:
        print(f"catalog embeddings: {meta['rows']:,} product texts in {embeddings_dir(settings)}")
        variants.append(FaustVariant("Faust + M1, catalog embeddings (matrix on)", True, matrix=True))
    variants.append(FaustVariant("Faust, no M1 (constant-cost relevance)", False))
    variants.append(
        FaustVariant("Faust, no M1, one record at a time (batch_max 1 / linger 0)", False, one_by_one=True)
    )
    faust_s: dict[str, list[float]] = {v.label: [] for v in variants}
    raw_s: list[float] = []
    for rep in range(repeats):
        # Alternate the order per repeat so a load change on the shared machine does not favour one row.
        order = variants if rep % 2 == 0 else variants[::-1]
        for variant in order:
            faust_s[variant.label].append(
                timed_isolated(base, f"f{variants.index(variant)}r{rep}", variant, warm, measured, threads)
            )
        raw_s.append(timed_isolated(base, f"rawr{rep}", None, warm, measured, threads))
        print(f"  repeat {rep + 1}/{repeats} done ({load_average()})")
    pure = {m: time_pure(settings, warm, measured, matrix=m) for m in ([False, True] if meta else [False])}
    feedback = measured.n_feedback
    print(
        f"\n== (b) aggregator, {n} queries, {feedback} feedback messages (+{n} query events), "
        f"{settings.topics.partitions} partitions, medians of {repeats} =="
    )
    print(f"{'path':<62} {'seconds':>8} {'feedback msgs/s':>16} {'of raw':>7}")
    raw = median(raw_s)

    def row(label: str, seconds: float) -> None:
        print(f"{label:<62} {seconds:>8.2f} {feedback / seconds:>16.0f} {raw / seconds:>7.1%}")

    row("raw kafka-python consume + produce, same messages", raw)
    for label, times in faust_s.items():
        row(label, median(times))
    for matrix, seconds in pure.items():
        row(f"pure attribution + M1 in-process, matrix {'on' if matrix else 'off'}", seconds)
    print(
        f"all runs (s): raw {[round(x, 2) for x in raw_s]}; "
        + "; ".join(
            f"{label.split(',')[-1].strip()} {[round(x, 2) for x in times]}"
            for label, times in faust_s.items()
        )
    )


def timed_isolated(
    base: Settings, name: str, variant: FaustVariant | None, warm: Traffic, measured: Traffic, threads: int
) -> float:
    """One timed run on its own topics and consumer group (a second run on the same topics would see the same
    event ids as duplicates): the Faust ``variant``, or the raw pass-through when None."""
    from qrloop.topics import ensure_topics

    prefix = f"bench-online-{uuid.uuid4().hex[:8]}-{name}"
    settings = isolate(base, prefix, Path(tempfile.gettempdir()) / prefix)  # no store: only its topics
    ensure_topics(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
            if variant is None:
                return time_raw(settings, prefix, warm, measured, Path(tmp))
            return time_faust(settings, variant, warm, measured, threads, Path(tmp))
    finally:
        delete_topics(settings.kafka.bootstrap_servers, prefix)
        shutil.rmtree(settings.cache_dir / "faust" / settings.streams.app_id, ignore_errors=True)


def cmd_aggregate_unscored(_args: argparse.Namespace) -> None:
    """The Faust worker of ``qrloop aggregate`` with every agent, but a relevance that costs nothing (a hash
    of the product id): what Faust, Kafka and attribution cost without M1."""
    from streams.aggregator import install_agents
    from streams.app import create_app
    from streams.attribution import CalibratedRelevance

    def relevance(_query: str, product_ids: Sequence[str]) -> Sequence[float]:
        return [zlib.crc32(pid.encode()) / 2**32 for pid in product_ids]

    # Faust's App.main() reads its own command line, as in `qrloop aggregate`.
    sys.argv = [sys.argv[0], "worker", "--loglevel", "info", "--without-web"]
    built = create_app(get_settings())
    install_agents(built, CalibratedRelevance(relevance, 0.5))
    built.app.main()


def cmd_speed(args: argparse.Namespace) -> None:
    settings = get_settings()
    set_threads(args.threads)
    print(load_average())
    if args.queries > 0:
        bench_rewriter(settings, args.policy_dir, args.queries, args.seed, args.best_of)
    if args.agg_queries > 0:
        bench_aggregator(settings, args.agg_queries, args.warm_queries, args.threads, args.seed, args.repeats)
    print("\n(DPO step: see benchmarks/bench_dpo.py — ours vs TRL vs LoRA vs the fp32 matmul bound)")
    print(load_average())


def cmd_passthrough(args: argparse.Namespace) -> None:
    """The raw baseline's process: consume the inputs, produce every message unchanged to ``--out``."""
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(
        *args.topics,
        bootstrap_servers=args.bootstrap,
        group_id=f"passthrough-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5)
    try:
        while True:
            for records in consumer.poll(timeout_ms=100).values():
                for record in records:
                    producer.send(args.out, key=record.key, value=record.value)
            producer.flush()
    except KeyboardInterrupt:
        pass
    finally:
        producer.close()
        consumer.close()


# ------------------------------------------------------------------------------------------------ latency


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` from the beginning, in offset order per partition."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise SystemExit(f"topic {topic} does not exist on {bootstrap}")
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        records: list[Any] = []
        while any(consumer.position(p) < ends[p] for p in parts):
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


SWAP_LINE = re.compile(r"^(\S+ \S+) INFO qrloop\.rewriter: .*(?:serves|serving) version (\d+)")


STEP_LINE = re.compile(r"^(\S+ \S+) INFO qrloop\.learner: DPO step (\d+) started")


def log_matches(log: Path, pattern: re.Pattern[str]) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` at the start of each line of ``log``, in order (none if it is missing)."""
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            match = pattern.match(line)
            if match:
                yield match


def log_times(log: Path, pattern: re.Pattern[str]) -> dict[int, float]:
    """number → epoch seconds of the first log line that ``pattern`` matches with it (group 1 the time, as
    logging wrote it, local; group 2 the number)."""
    found: dict[int, float] = {}
    for match in log_matches(log, pattern):
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.setdefault(int(match.group(2)), when)
    return found


def swap_times(log: Path) -> dict[int, float]:
    """version → epoch seconds of the rewriter's swap log line."""
    return log_times(log, SWAP_LINE)


# "(X s)" before gradient batching, "(X s, Y s of it as the pairs arrived)" since: X is the step's compute.
STEP_DONE_LINE = re.compile(r"^\S+ \S+ INFO qrloop\.learner: DPO step (\d+): loss .* \(([\d.]+) s[,)]")


def step_seconds(log: Path, store: Any) -> dict[int, float]:
    """version → seconds of the DPO step that made it, as the learner logged it."""
    took: dict[int, float] = {}
    for match in log_matches(log, STEP_DONE_LINE):
        took.setdefault(int(match.group(1)), float(match.group(2)))
    return {v.id: took[v.train_steps] for v in store.list() if v.train_steps in took}


def step_starts(log: Path, store: Any) -> dict[int, float]:
    """version → epoch seconds of the learner's "DPO step N started" line of the step that made it: what
    the 16th pair waited for before its step began (the reference terms still to compute, the poll)."""
    started = log_times(log, STEP_LINE)
    return {v.id: started[v.train_steps] for v in store.list() if v.train_steps in started}


def first_served(records: Sequence[Any]) -> dict[int, float]:
    from qrloop.events import QueryEvent, SchemaError, decode

    found: dict[int, float] = {}
    for record in records:
        try:
            version = decode(QueryEvent, record.value).policy_version
        except SchemaError:
            continue
        if version is not None:
            found[version] = min(found.get(version, float("inf")), record.timestamp / 1000)
    return found


def announced(records: Sequence[Any], alias: str) -> dict[int, float]:
    from qrloop.events import PolicyAnnouncement, SchemaError, decode

    found: dict[int, float] = {}
    for record in records:
        try:
            note = decode(PolicyAnnouncement, record.value)
        except SchemaError:
            continue
        if note.kind == "alias_moved" and note.alias == alias:
            found.setdefault(note.version, record.timestamp / 1000)
    return found


def sixteenth_pairs(store: Any, pairs: Sequence[Any], topic: str) -> dict[int, float]:
    """version → Kafka timestamp of the last pair its step consumed: of the pairs just before the offsets
    stored with it, one per partition of the topic, the latest (a partition the batch took nothing from holds
    an older pair there, so the latest is the batch's own last)."""
    by_offset = {(r.partition, r.offset): r.timestamp / 1000 for r in pairs}
    found: dict[int, float] = {}
    for version in store.list(newest_first=False):
        for key, offset in version.offsets.items():
            name, _, partition = key.rpartition(":")
            if name == topic and (int(partition), offset - 1) in by_offset:
                last = by_offset[(int(partition), offset - 1)]
                found[version.id] = max(found.get(version.id, last), last)
    return found


def cmd_latency(args: argparse.Namespace) -> None:
    base = get_settings()
    run_dir = Path(args.run).expanduser()
    settings = run_settings(base, run_dir)
    bootstrap, t = settings.kafka.bootstrap_servers, settings.topics
    store = open_store(settings)
    starts = sixteenth_pairs(store, read_topic(bootstrap, t.preference_pairs), t.preference_pairs)
    step_started = step_starts(run_dir / "learner.log", store)
    took = step_seconds(run_dir / "learner.log", store)
    store.close()
    ends = {
        "step started": step_started,
        "announced": announced(read_topic(bootstrap, t.policy_versions), settings.dpo.alias),
        "swapped (log)": swap_times(run_dir / "rewriter.log"),
        "first served": first_served(read_topic(bootstrap, t.query_events)),
    }
    print(f"== latency: run {run_dir.name}, 16th pair of each step → new version served ==")
    ratios = ("announced", "first served")  # also as × the step that made the version
    columns = ["step s", *(f"{name} s" for name in ends), *(f"{name} ×" for name in ratios)]
    print(f"{'version':>7} " + " ".join(f"{name:>16}" for name in columns))
    values: dict[str, list[float]] = {name: [] for name in columns}
    for version, start in sorted(starts.items()):
        row: dict[str, float] = {"step s": took[version]} if version in took else {}
        for name, times in ends.items():
            if version in times:
                row[f"{name} s"] = times[version] - start
        for name in ratios:
            if f"{name} s" in row and version in took:
                row[f"{name} ×"] = row[f"{name} s"] / took[version]
        for name, value in row.items():
            values[name].append(value)
        print(f"{version:>7} " + " ".join(f"{row[c]:>16.2f}" if c in row else f"{'—':>16}" for c in columns))
    for label, fn in (("median", median), ("max", max)):
        print(f"{label:>7} " + " ".join(f"{fn(v):>16.2f}" if v else f"{'—':>16}" for v in values.values()))
    print(
        "(the step itself — DPO, publish, announce — is inside 'announced'; 'step started' is what the 16th "
        "pair waited for before it (reference terms left to compute, the poll); 'first served' also waits "
        "for the next shopper's query)"
    )


# --------------------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = root.add_subparsers(dest="command", required=True)
    t3 = sub.add_parser("table3", help="Table 3 and Table 4 on held-out queries: first vs last version")
    t3.add_argument("--run", required=True, help="a demo run's directory (~/.cache/qrloop/runs/<id>)")
    t3.add_argument("--queries", type=int, default=200)
    t3.add_argument("--versions", help="FIRST,LAST (default: the run's first and last versions)")
    t3.add_argument("--profiles", type=int, default=20, help="shopper profiles the expectations average")
    t3.add_argument(
        "--m1-threshold", type=float, default=0.5, help="coverage: M1 score of a relevant product"
    )
    t3.set_defaults(fn=cmd_table3)
    off = sub.add_parser("offline", help="online reward of the offline phase's models on held-out queries")
    off.add_argument(
        "--dirs",
        default="T/V=../models/smollm2-135m-instruct,T/P=teacher,S/P=student-p,T→S/P=minielm",
        help="NAME=DIR,...; relative DIRs are under <cache_dir>/offline",
    )
    off.add_argument("--queries", type=int, default=40)
    off.add_argument("--profiles", type=int, default=20)
    off.add_argument("--m1-threshold", type=float, default=0.5)
    off.add_argument("--threads", type=int, default=1)
    off.add_argument("--seed", type=int, default=1234)
    off.add_argument(
        "--catalog-vocabulary",
        help="NAME,...: serve these models over the catalog's and training queries' tokens only "
        "(qrloop.vocabulary); name a directory twice in --dirs to compare",
    )
    off.set_defaults(fn=cmd_offline)
    speed = sub.add_parser("speed", help="rewriter vs bare generate; Faust aggregator vs raw kafka-python")
    speed.add_argument("--queries", type=int, default=20, help="rewriter queries (0: skip)")
    speed.add_argument("--policy-dir", help="an HF policy directory (default: the store's production)")
    speed.add_argument(
        "--best-of", type=int, default=8, help="also time best-of-N serving with this N (2 or less: skip)"
    )
    speed.add_argument("--agg-queries", type=int, default=100, help="aggregator queries (0: skip)")
    speed.add_argument("--warm-queries", type=int, default=4, help="untimed queries before each measurement")
    speed.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each aggregator row (medians; order alternates)"
    )
    speed.set_defaults(fn=cmd_speed)
    lat = sub.add_parser("latency", help="16th pair → new version served, from a demo run's artefacts")
    lat.add_argument("--run", required=True)
    lat.set_defaults(fn=cmd_latency)
    passthrough = sub.add_parser("_passthrough", help="internal: the raw baseline's process")
    passthrough.add_argument("--bootstrap", required=True)
    passthrough.add_argument("--out", required=True)
    passthrough.add_argument("topics", nargs="+")
    passthrough.set_defaults(fn=cmd_passthrough)
    unscored = sub.add_parser("_aggregate_unscored", help="internal: the Faust worker without M1")
    unscored.set_defaults(fn=cmd_aggregate_unscored)
    for p in (t3, speed, lat):
        p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
        p.add_argument("--seed", type=int, default=1234)
    return root


def main() -> None:
    args = parser().parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
