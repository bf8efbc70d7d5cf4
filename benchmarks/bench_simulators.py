"""Figures of the simulators, measured in one run on this machine.

1. Search: index time, median / p99 latency over real training queries and NDCG@10 on labelled training
   queries, for the chosen engine (tantivy) and the other one (bm25s), side by side.
2. M1 on held-out labels: Spearman with human relevance and NDCG@10, against plain MiniLM cosine.
3. The click-model judge's throughput (lists judged per second), with M1 scoring unlabelled products.
4. Sanity: the reward components of the original query's list against random product lists.

Run: ``.venv/bin/python benchmarks/bench_simulators.py`` (a few minutes on 2 CPU cores; M1 must be trained,
else its rows show the cosine fallback).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from learner.offline.relevance import evaluate, heldout_queries
from qrloop import rewards
from qrloop.catalog import Catalog
from qrloop.relevance import RelevanceModel, cosine_scorer
from qrloop.settings import Settings, get_settings
from simulators.judge import ClickModelJudge, labelled_or_model
from simulators.profiles import ProfilePool
from simulators.search import BACKENDS, DEFAULT_BACKEND, SearchEngine, ensure_index


def dcg(gains: Sequence[float]) -> float:
    return float(sum(g / np.log2(i + 2) for i, g in enumerate(gains)))


def search_ndcg(catalog: Catalog, search: Callable[[str], list[str]], queries: Sequence[str]) -> float:
    """Mean NDCG@10: gains = human relevance (unlabelled 0), ideal = the query's labelled products."""
    values = []
    for query in queries:
        labelled = catalog.labelled(query)
        ideal = dcg(sorted(labelled.values(), reverse=True)[:10])
        values.append(dcg([labelled.get(p, 0.0) for p in search(query)[:10]]) / ideal if ideal else 0.0)
    return float(np.mean(values))


def latencies_ms(search: Callable[[str], list[str]], queries: Sequence[str]) -> np.ndarray:
    for query in queries[:20]:  # warm caches (mmap pages, vocabularies)
        search(query)
    out = []
    for query in queries:
        started = time.perf_counter()
        search(query)
        out.append((time.perf_counter() - started) * 1000)
    return np.array(out)


def bench_search(settings: Settings, catalog: Catalog, n_latency: int, min_labels: int) -> None:
    train = catalog.dataset.train_queries
    latency_queries = train["query"].sample(n_latency, random_state=0).tolist()
    ndcg_queries = train[train["n_labels"] >= min_labels]["query"].tolist()
    print(f"\n== search: {len(catalog):,} products, k = 10, one thread ==")
    print(
        f"latency over {len(latency_queries)} training queries; NDCG@10 over {len(ndcg_queries):,} training"
    )
    print(f"queries with >= {min_labels} labels")
    print(f"{'engine':<10} {'index s':>8} {'median ms':>10} {'p99 ms':>8} {'NDCG@10':>8}")
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        fresh = settings.model_copy(update={"cache_dir": Path(tmp)})
        for name in sorted(BACKENDS, key=lambda b: b != DEFAULT_BACKEND):
            info = ensure_index(fresh, name, catalog.dataset)  # a fresh build: honest index time
            engine = SearchEngine.open(fresh, name, dataset=catalog.dataset)
            lat = latencies_ms(engine.search, latency_queries)
            ndcg = search_ndcg(catalog, engine.search, ndcg_queries)
            medians[name] = float(np.median(lat))
            chosen = " (chosen)" if name == DEFAULT_BACKEND else ""
            print(
                f"{name:<10} {info.built_s or 0.0:>8.2f} {np.median(lat):>10.3f} "
                f"{np.percentile(lat, 99):>8.3f} {ndcg:>8.4f}{chosen}"
            )
    other = next(b for b in medians if b != DEFAULT_BACKEND)
    print(
        f"median latency ratio {other} / {DEFAULT_BACKEND}: {medians[other] / medians[DEFAULT_BACKEND]:.1f}x"
    )


def bench_m1(settings: Settings, catalog: Catalog, model: RelevanceModel, n_queries: int | None) -> None:
    dataset_queries = heldout_queries(catalog.dataset, n_queries, settings.seed)
    print(f"\n== relevance model M1 on held-out labels ({len(dataset_queries)} held-out queries) ==")
    rows = {f"M1 ({model.kind})": evaluate(model.score, dataset_queries, settings.seed)}
    rows["plain MiniLM cosine"] = evaluate(cosine_scorer(settings), dataset_queries, settings.seed)
    print(f"{'model':<26} {'Spearman':>9} {'NDCG@10':>8} {'random NDCG@10':>15} {'pairs/s':>8}")
    for name, r in rows.items():
        print(
            f"{name:<26} {r['spearman']:>9.3f} {r['ndcg@10']:>8.3f} {r['ndcg@10_random']:>15.3f} "
            f"{r['pairs_per_s']:>8.0f}"
        )
    m1, cos = rows[f"M1 ({model.kind})"], rows["plain MiniLM cosine"]
    print(
        f"M1 − cosine: Spearman {m1['spearman'] - cos['spearman']:+.3f}, "
        f"NDCG@10 {m1['ndcg@10'] - cos['ndcg@10']:+.3f} "
        f"(over {m1['ranked_queries']} queries whose labels differ, {m1['pairs']} pairs)"
    )


def bench_judge_and_rewards(
    settings: Settings, catalog: Catalog, model: RelevanceModel, n_lists: int
) -> None:
    engine = SearchEngine.open(settings, dataset=catalog.dataset)
    judge = ClickModelJudge(labelled_or_model(catalog, model.score))
    pool = ProfilePool(settings.seed, 200, list(catalog.brands())[:50])
    rng = np.random.default_rng(settings.seed)
    train = catalog.dataset.train_queries
    queries = train[train["n_labels"] >= 5]["query"].sample(n_lists, random_state=1).tolist()
    lists = [catalog.products(engine.search(q)) for q in queries]
    profiles = [pool.draw(rng) for _ in queries]
    print(f"\n== ClickModelJudge throughput ({n_lists} lists of the original query's top 10) ==")
    for label in ("cold M1 cache", "warm M1 cache"):
        started = time.perf_counter()
        for profile, query, products in zip(profiles, queries, lists, strict=True):
            judge.judge(profile, query, products, rng)
        seconds = time.perf_counter() - started
        print(f"{label:<14} {n_lists / seconds:>9.0f} lists/s")
    labels_only = ClickModelJudge(lambda q, ps: np.array([catalog.grade(q, p.product_id) or 0.0 for p in ps]))
    started = time.perf_counter()
    for profile, query, products in zip(profiles, queries, lists, strict=True):
        labels_only.judge(profile, query, products, rng)
    print(f"{'labels only':<14} {n_lists / (time.perf_counter() - started):>9.0f} lists/s (no M1)")

    print("\n== reward of the original query's list vs random product lists (same queries) ==")
    all_ids = np.array(catalog.product_ids)
    weights = settings.rewards
    totals: dict[str, list[rewards.RewardComponents]] = {"original": [], "random": []}
    for profile, query, products in zip(profiles, queries, lists, strict=True):
        original = [p.product_id for p in products]
        random_ids = rng.choice(all_ids, size=len(original) or 10, replace=False).tolist()
        for key, ids in (("original", original), ("random", random_ids)):
            shown = catalog.products(ids)
            counts = judge.judge(profile, query, shown, rng).counts
            scores = model.score(query, [p.text for p in shown]).tolist()
            totals[key].append(
                rewards.components(
                    original,
                    ids,
                    scores,
                    clicks=counts["clicks"],
                    add2carts=counts["add_to_carts"],
                    purchases=counts["purchases"],
                )
            )
    print(f"{'list':<9} {'relevance':>9} {'diversity':>9} {'click':>7} {'a2c':>7} {'buy':>7} {'combined':>8}")
    means = {}
    for key, comps in totals.items():
        r = {f: float(np.mean([getattr(c, f) for c in comps])) for f in comps[0].as_dict()}
        means[key] = r
        combined = float(np.mean([c.combined(weights) for c in comps]))
        print(
            f"{key:<9} {r['relevance']:>9.3f} {r['diversity']:>9.3f} {r['click']:>7.3f} "
            f"{r['add2cart']:>7.3f} {r['purchase']:>7.3f} {combined:>8.3f}"
        )
    ratio = means["original"]["relevance"] / max(means["random"]["relevance"], 1e-9)
    print(f"relevance original / random: {ratio:.1f}x (M1 = {model.kind})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--min-labels", type=int, default=5, help="NDCG queries need this many labels")
    parser.add_argument("--heldout-queries", type=int, default=500, help="0: every held-out query")
    parser.add_argument("--judge-lists", type=int, default=300)
    args = parser.parse_args()

    settings = get_settings()
    catalog = Catalog.open(settings)
    bench_search(settings, catalog, args.latency_queries, args.min_labels)
    model = RelevanceModel.load(settings)
    bench_m1(settings, catalog, model, args.heldout_queries or None)
    bench_judge_and_rewards(settings, catalog, model, args.judge_lists)


if __name__ == "__main__":
    main()
