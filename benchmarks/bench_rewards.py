"""Does the reward DPO ranks by pay for the right rewrites? The old (paper) and the new (gain) side by side.

``sanity`` (the default): on misspelled *training-split* queries of Home Depot's spelling corrections
(``hd_query_spell_corrections.csv``), the original query's own top 10 is compared with four rewrites of it:

- echo        the query itself (its list is the original's own top 10);
- correction  the known spelling correction: a rewrite known to be good;
- drift       another, random training query: a fluent rewrite that leaves the shopper's intent;
- random      ten random catalog products: drift at its worst (all new, all irrelevant);
- vN          with ``--run RUN_ID --versions A,B``: the first rewrite versions A and B of that run would serve
              (seeded, as the rewriter samples it): what DPO actually compares a correction against. If the
              policy's own rewrites out-earn the correction on misspelled queries, no amount of DPO on this
              reward teaches spelling.

Every list is scored against the shopper's original query by M1 and judged by ``shoppers`` simulated shoppers
(the click model, human labels where raters judged the pair), exactly as the aggregator scores a rewrite.
It prints the mean components, both scalars, how often each direction holds query by query, and the noise of
the same rewrite's reward across shoppers, from which ``rewards.margin`` is set.

``pairs --run RUN_ID``: the traffic of one demo run (its own topics) re-attributed with the old reward at the
old margin and with the new one: ties, echo chosen, served echo rate (the same events, both rewards).

Run: ``python benchmarks/bench_rewards.py [sanity --queries 200 --shoppers 8 [--run RUN_ID --versions A,B] |
pairs --run RUN_ID]``
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from learner.evaluate_online import corrects
from qrloop import rewards
from qrloop.catalog import Catalog
from qrloop.data import is_heldout, source_folder
from qrloop.events import QueryEvent
from qrloop.relevance import RelevanceModel
from qrloop.relevance_threshold import calibration, relevant_above
from qrloop.runs import open_store
from qrloop.serving import Rewriter, load_stored_version
from qrloop.settings import RewardSettings, Settings, get_settings
from simulators.judge import ClickModelJudge, labelled_or_model
from simulators.profiles import ProfilePool
from simulators.search import SearchEngine

LISTS = ("echo", "correction", "drift", "random")
PAPER = RewardSettings(ranking="paper")  # the old scalar at its old margin (0.02)


def training_corrections(settings: Settings, catalog: Catalog, n: int, seed: int) -> pd.DataFrame:
    """Misspelled → corrected pairs whose misspelled query is a training-split query of the catalog."""
    frame = pd.read_csv(source_folder(settings) / "hd_query_spell_corrections.csv")
    frame = frame[
        [
            not is_heldout(q) and not is_heldout(c)
            for q, c in zip(frame["query_misspelled"], frame["query_corrected"], strict=True)
        ]
    ]
    known = set(catalog.dataset.train_queries["query"].str.lower())
    frame = frame[frame["query_misspelled"].str.lower().isin(known)]
    return frame.sample(n=min(n, len(frame)), random_state=seed).reset_index(drop=True)


@dataclass
class Scores:
    """One list's rewards over the shoppers who judged it."""

    paper: list[float] = field(default_factory=list)
    gain: list[float] = field(default_factory=list)
    components: list[rewards.RewardComponents] = field(default_factory=list)
    new_human_relevant: int = 0


def judge_list(
    query: str,
    rewrite: str,
    original: Sequence[str],
    products: Sequence[str],
    env: Env,
    tau: float,
    shoppers: int,
) -> Scores:
    shown = env.catalog.products(list(products))
    scores = env.model.score(query, [p.text for p in shown]).tolist()
    out = Scores()
    for _ in range(shoppers):
        outcome = env.judge.judge(env.pool.draw(env.rng), query, shown, env.rng)
        flags = (outcome.clicks, outcome.add_to_carts, outcome.purchases)
        sets = [frozenset(p for p, hit in zip(products, f, strict=True) if hit) for f in flags]
        c = rewards.rewrite_components(
            query, rewrite, original, products, scores, rewards.Feedback(*sets), tau
        )
        out.components.append(c)
        out.paper.append(c.combined(PAPER))
        out.gain.append(c.gain(env.settings.rewards))
    labelled = env.catalog.labelled(query)
    out.new_human_relevant = sum(labelled.get(p, 0.0) >= 0.75 for p in set(products) - set(original))
    return out


@dataclass
class Env:
    settings: Settings
    catalog: Catalog
    model: RelevanceModel
    engine: SearchEngine
    judge: ClickModelJudge
    pool: ProfilePool
    rng: np.random.Generator


def open_env(settings: Settings, seed: int) -> Env:
    catalog = Catalog.open(settings)
    model = RelevanceModel.load(settings)
    return Env(
        settings,
        catalog,
        model,
        SearchEngine.open(settings, dataset=catalog.dataset),
        ClickModelJudge(labelled_or_model(catalog, model.score)),
        ProfilePool(seed, 500, list(catalog.brands())[:50]),
        np.random.default_rng(seed),
    )


def policy_rewrites(
    settings: Settings, run_dir: Path, versions: str | None, queries: Sequence[str], engine: SearchEngine
) -> dict[str, list[str]]:
    """``vN`` → the first rewrite version N of the run serves for each query (torch seeded per query)."""
    from bench_learning import pick_two, sampled
    from bench_online import run_settings

    store = open_store(run_settings(settings, run_dir))
    catalog = Catalog.open(settings)
    hints = catalog.hints(engine.search)
    out: dict[str, list[str]] = {}
    try:
        for version in dict.fromkeys(pick_two(store, versions)):
            policy = load_stored_version(store, store.get(version))
            rewriter = Rewriter(policy, engine.search, settings.rewriter, settings.seed, hints=hints)
            out[f"v{version}"] = [sampled(rewriter, q, settings.seed + i)[0] for i, q in enumerate(queries)]
            print(f"  v{version}: rewrites sampled", flush=True)
    finally:
        store.close()
    return out


def sanity(
    settings: Settings,
    n_queries: int,
    shoppers: int,
    seed: int,
    run_dir: Path | None = None,
    versions: str | None = None,
) -> None:
    env = open_env(settings, seed)
    threshold = calibration(settings, env.model, env.catalog.dataset)
    tau = relevant_above(settings, env.model, env.catalog.dataset)
    settings.rewards.relevant_above = tau
    print(
        f"M1 = {env.model.kind}; relevance threshold τ = {tau:.3f} (balanced accuracy "
        f"{threshold.balanced_accuracy:.3f} separating human relevance >= 0.75 from below on "
        f"{threshold.positives} + {threshold.negatives} training labels)"
    )
    pairs = training_corrections(settings, env.catalog, n_queries, seed)
    k = settings.rewriter.top_k_products
    train = env.catalog.dataset.train_queries["query"].tolist()
    all_ids = np.array(env.catalog.product_ids)
    served = (
        policy_rewrites(settings, run_dir, versions, pairs["query_misspelled"].tolist(), env.engine)
        if run_dir is not None
        else {}
    )
    results: dict[str, list[Scores]] = {name: [] for name in (*LISTS, *served)}
    for i, (query, corrected) in enumerate(
        zip(pairs["query_misspelled"], pairs["query_corrected"], strict=True), 1
    ):
        if i % 20 == 0:
            print(f"  {i} / {len(pairs)} queries", flush=True)
        original = env.engine.search(query)[:k]
        drift = train[int(env.rng.integers(len(train)))]
        lists = {
            "echo": (query, original),
            "correction": (corrected, env.engine.search(corrected)[:k]),
            "drift": (drift, env.engine.search(drift)[:k]),
            "random": ("(random products)", env.rng.choice(all_ids, size=k, replace=False).tolist()),
        } | {name: (texts[i - 1], env.engine.search(texts[i - 1])[:k]) for name, texts in served.items()}
        for name, (text, products) in lists.items():
            results[name].append(judge_list(query, text, original, products, env, tau, shoppers))
    dump = settings.cache_dir / "bench_rewards_sanity.json"
    dump.write_text(json.dumps({k: [asdict(r) for r in rows] for k, rows in results.items()}))
    print(f"(every draw written to {dump})")
    report({name: results[name] for name in LISTS}, settings.rewards, shoppers)  # the margin: these four
    if served:
        report_policies(pairs, served, results, settings.rewards.margin)


def report_policies(
    pairs: pd.DataFrame, served: dict[str, list[str]], results: dict[str, list[Scores]], margin: float
) -> None:
    """Per version: how often its rewrite is the correction, and how the gain ranks the two when it is not."""
    cases = list(zip(pairs["query_misspelled"], pairs["query_corrected"], strict=True))
    print(f"\nthe policy's own rewrite against the correction (gain; 'clear': by more than {margin})")
    columns = f"{'correction > it':>16} {'clear':>7} {'it > correction':>16}"
    print(f"{'version':<8} {'corrects':>9} {'gain':>7} {columns}")
    for name, texts in served.items():
        fixed = np.array([corrects(a, b, t) for (a, b), t in zip(cases, texts, strict=True)])
        diffs = np.array(
            [
                mean_of(c.gain) - mean_of(v.gain)
                for c, v in zip(results["correction"], results[name], strict=True)
            ]
        )[~fixed]
        print(
            f"{name:<8} {fixed.mean():>9.1%} {mean_of([g for r in results[name] for g in r.gain]):>7.4f} "
            f"{(diffs > 0).mean():>16.1%} {(diffs > margin).mean():>7.1%} {(diffs < -margin).mean():>16.1%}"
        )
    print("(the last three over the queries whose rewrite does not correct the misspelling)")


def mean_of(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def report(results: dict[str, list[Scores]], weights: RewardSettings, shoppers: int) -> None:
    n = len(results["echo"])
    print(f"\n== {n} misspelled training queries, {shoppers} simulated shoppers per list; means ==")
    fields = ("relevance", "diversity", "click", "add2cart", "purchase", "novelty", "engagement")
    header = " ".join(f"{f[:9]:>9}" for f in fields)
    print(f"{'list':<11} {header} {'paper':>7} {'gain':>7} {'new human-relevant':>19}")
    for name, rows in results.items():
        comps = [c for r in rows for c in r.components]
        cells = " ".join(f"{mean_of([getattr(c, f) for c in comps]):>9.3f}" for f in fields)
        paper = mean_of([v for r in rows for v in r.paper])
        gain = mean_of([v for r in rows for v in r.gain])
        human = mean_of([r.new_human_relevant for r in rows])
        print(f"{name:<11} {cells} {paper:>7.4f} {gain:>7.4f} {human:>19.2f}")

    margin = noise_margin(results)
    print(f"\nnoise of the same rewrite across {shoppers} shoppers (lists whose reward varies):")
    for scalar in ("paper", "gain"):
        sds = [float(np.std(getattr(r, scalar), ddof=1)) for rows in results.values() for r in rows]
        varying = [s for s in sds if s > 0]
        print(
            f"  {scalar:<5} median sd {np.median(varying):.4f}, so the sd of a difference of two draws of "
            f"one rewrite is {math.sqrt(2) * np.median(varying):.4f} "
            f"({len(varying)} of {len(sds)} lists vary)"
        )
    for name in ("drift", "random"):
        draws = np.array([g for r in results[name] for g in r.gain])
        print(
            f"  single-shopper gain of a {name} list: share > 0 {(draws > 0).mean():.1%}, percentiles "
            f"50/90/95 {np.percentile(draws, 50):.4f} / {np.percentile(draws, 90):.4f} / "
            f"{np.percentile(draws, 95):.4f}"
        )
    print(f"  margin from that noise (the sd of a difference): {margin:.4f} (configured: {weights.margin})")
    for scalar, m in (("paper", PAPER.margin), ("gain", weights.margin)):
        print(
            f"  two shoppers' {scalar} rewards of the same rewrite differ by more than the margin {m}: "
            f"{same_rewrite_disagreement(results, scalar, m):.1%} of draws (a pure-noise preference)"
        )

    print(
        "\nshare of queries where the direction holds (mean over shoppers; 'clear': by more than the margin)"
    )
    print(f"{'direction':<24} {'paper':>7} {'clear@0.02':>11} {'gain':>7} {'clear@margin':>13}")
    for better, worse in (
        ("correction", "echo"),
        ("correction", "random"),
        ("correction", "drift"),
        ("echo", "random"),
        ("echo", "drift"),
    ):
        shares: list[str] = []
        for scalar, m in (("paper", PAPER.margin), ("gain", weights.margin)):
            diffs = np.array(
                [
                    mean_of(getattr(b, scalar)) - mean_of(getattr(w, scalar))
                    for b, w in zip(results[better], results[worse], strict=True)
                ]
            )
            shares += [f"{(diffs > 0).mean():>7.1%}", f"{(diffs > m).mean():>11.1%}"]
        print(f"{better + ' > ' + worse:<24} {shares[0]} {shares[1]} {shares[2]} {shares[3]:>13}")
    useful = [r for r in results["correction"] if r.new_human_relevant > 0]
    print(
        f"corrections that add a human-relevant product: {len(useful)} of {n}; their mean gain "
        f"{mean_of([v for r in useful for v in r.gain]):.4f} vs echo 0 (paper: "
        f"{mean_of([v for r in useful for v in r.paper]):.4f} vs echo "
        f"{mean_of([v for r in results['echo'] for v in r.paper]):.4f})"
    )


def noise_margin(results: dict[str, list[Scores]]) -> float:
    """``rewards.margin``: the sd of the difference between two shoppers' gains of the *same* rewrite, i.e.
    √2 × the median (over lists whose gain varies at all) of the per-list sd across shoppers.

    Two draws of one rewrite differ by about that much by chance alone; a preference smaller than that is
    noise, a tie. (M1's novelty is deterministic: all of this noise is the shoppers'.)
    """
    sds = [float(np.std(r.gain, ddof=1)) for rows in results.values() for r in rows]
    varying = [s for s in sds if s > 0]
    return math.sqrt(2) * float(np.median(varying)) if varying else 0.0


def same_rewrite_disagreement(results: dict[str, list[Scores]], scalar: str, margin: float) -> float:
    """Share of pairs of two shoppers' draws of the same rewrite that differ by more than ``margin``: how
    often a pair of equally good rewrites would be emitted as a preference."""
    diffs = [
        abs(draws[i] - draws[i + 1])
        for rows in results.values()
        for r in rows
        for draws in [getattr(r, scalar)]
        for i in range(0, len(draws) - 1, 2)
    ]
    return float(np.mean([d > margin for d in diffs])) if diffs else float("nan")


def pairs(settings: Settings, run_id: str, limit: int | None) -> None:
    """The same traffic, attributed with the old and with the new reward (the first ``limit`` queries)."""
    from qrloop.cli.demo import make_run
    from streams.aggregator import make_relevance_fn
    from streams.replay import attribute, export_log, parse, read_jsonl

    run = make_run(settings, run_id)
    path = run.run_dir / "traffic.jsonl"
    if not path.is_file():
        export_log(run.settings, path)
    events = parse(read_jsonl(path)).events
    if limit is not None:
        first = sorted((e for e in events if isinstance(e, QueryEvent)), key=lambda e: e.event_time)[:limit]
        kept = {q.event_id for q in first}
        events = [
            e for e in events if (e.event_id if isinstance(e, QueryEvent) else e.query_event_id) in kept
        ]
    relevance = make_relevance_fn(run.settings)
    queries = [e for e in events if isinstance(e, QueryEvent)]
    echo = sum(rewards.is_echo(e.query, r.text) for e in queries for r in e.rewrites)
    same = sum(rewards.same_text(e.rewrites[0].text, e.rewrites[1].text) for e in queries)
    resampled = sum(any(r.draw > 1 for r in e.rewrites) for e in queries)
    print(
        f"run {run_id}: {len(queries)} queries; served rewrites that echo the query "
        f"{echo / 2 / len(queries):.1%}, "
        f"queries whose two rewrites are the same text {same / len(queries):.1%}, resampled {resampled}"
    )
    print(f"{'reward':<22} {'margin':>7} {'pairs':>6} {'ties':>6} {'tie rate':>9} {'echo chosen':>12}")
    for name, weights in (
        ("paper (old)", run.settings.rewards.model_copy(update={"ranking": "paper", "margin": 0.02})),
        ("gain (new)", run.settings.rewards),
    ):
        scored = attribute(events, relevance, run.settings.model_copy(update={"rewards": weights})).closed
        made = [c.scored.pair for c in scored if c.scored.pair is not None]
        chosen_echo = sum(rewards.is_echo(p.prompt, p.chosen) for p in made)
        print(
            f"{name:<22} {weights.margin:>7.4f} {len(made):>6} {len(scored) - len(made):>6} "
            f"{(len(scored) - len(made)) / max(1, len(scored)):>9.1%} {chosen_echo:>12}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("sanity")
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--shoppers", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--run", default=None, help="run id of a demo run: add its versions' rewrites")
    s.add_argument("--versions", default=None, help="FIRST,LAST of --run (default: its first and last)")
    p = sub.add_parser("pairs")
    p.add_argument("--run", required=True, help="run id of a demo run (its directory under <cache>/runs)")
    p.add_argument("--queries", type=int, default=None, help="only the run's first N queries")
    args = parser.parse_args()
    settings = get_settings()
    if args.command == "pairs":
        pairs(settings, args.run, args.queries)
    else:
        sanity(
            settings,
            getattr(args, "queries", 200),
            getattr(args, "shoppers", 8),
            getattr(args, "seed", 0),
            settings.cache_dir / "runs" / args.run if getattr(args, "run", None) else None,
            getattr(args, "versions", None),
        )


if __name__ == "__main__":
    main()
