"""How far can two rewrites take the human-label recall on this search engine? (issue #12's ≥ 1.3× target)

    .venv/bin/python benchmarks/bench_headroom.py [--run ~/.cache/qrloop/runs/<id>] [--version production]

``bench_learning.py`` measures what a version's two served rewrites add to the original query's top 10 in
products raters judged relevant (the recall ratio, original ∪ rewrites / original). This measures what *could*
be added, on the same held-out queries and the same search engine, so that a missed target can be read as
"the policy has not learned it" or "nothing this policy writes would reach it":

- ``deeper``: the original's own top 30, as many products as the original and two rewrites show, no rewriting;
- ``oracle titles``: two rewrites written from relevant labelled products the original's top 10 misses (the
  first ``--title-words`` words of each title): what two rewrites that name a judged product could reach;
- ``expansions``: the query and one more word, for each of the words its top 30's titles use most
  (``qrloop.prompting.result_words``, what the warm start's expansion pairs are made of), two kept: the
  two the reward ranks highest and the two that recall the most by the labels;
- the version's own samples, ``--samples`` per query at the serving temperature (distinct, not echoes), of
  which two are kept: the first two (what serving keeps), the two the learner's reward would rank highest
  (relevance-weighted novelty, the M1 part of the gain; engagement is the simulated shopper's and random), and
  the two whose union recalls the most by the human labels (an oracle: what the policy can already write).

The gap between "first two" and "best two by labels" is what DPO on this policy's own samples can at most
teach; the agreement of "best two by reward" with "best two by labels" is how well the reward points there.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_online import bare_generate, heldout_setup, load_average, run_settings, set_threads

from learner import evaluate_online as ev
from learner.offline.q2q import title_prefix
from qrloop import rewards
from qrloop.prompting import result_words, user_message
from qrloop.relevance_threshold import relevant_above
from qrloop.runs import open_store
from qrloop.serving import LoadedPolicy, Rewriter, Sampled, load_stored_version, useful_distinct
from qrloop.settings import Settings, get_settings

Lists = list[list[str]]


@dataclass(frozen=True)
class Query:
    """One held-out query: its judged-relevant products, the original's top k, and the candidate lists."""

    text: str
    relevant: set[str]
    original: list[str]
    deeper: list[str]
    oracle: Lists
    samples: list[str]
    sample_lists: Lists
    novelty: list[float]
    expansion_lists: Lists
    expansion_novelty: list[float]


def sample_texts(
    policy: LoadedPolicy, query: str, n: int, settings: Settings, seed: int, prompt: str | None = None
) -> list[str]:
    """Up to ``n`` distinct rewrites of ``query`` that are neither empty nor echoes, in draw order; sampled
    from ``prompt``'s text where given (``bench_hints.py``: the query with its results' words), else the
    query's."""
    torch.manual_seed(seed)
    texts = bare_generate(policy, prompt or query, settings.rewriter, n)
    drawn = [Sampled(" ".join(t.split()), 0.0) for t in texts]  # the log-probabilities are not needed here
    return [s.text for s in useful_distinct(query, drawn)]


def oracle_rewrites(titles: Sequence[str], words: int) -> list[str]:
    return [title_prefix(t, words) for t in titles]


def union_recall(q: Query, lists: Lists) -> float:
    found = ev.recall(q.original, lists, q.relevant)
    return found.union / found.relevant


def best_pair(q: Query, lists: Lists, value: Callable[[tuple[int, ...]], float]) -> Lists:
    """The two of ``lists`` (fewer when there are fewer) that maximise ``value`` of their indices."""
    if len(lists) <= 2:
        return lists
    pair = max(itertools.combinations(range(len(lists)), 2), key=value)
    return [lists[i] for i in pair]


def best_by_reward(q: Query, lists: Lists, novelty: Sequence[float]) -> Lists:
    return best_pair(q, lists, lambda ij: sum(novelty[i] for i in ij))


def best_by_labels(q: Query, lists: Lists) -> Lists:
    return best_pair(q, lists, lambda ij: union_recall(q, [lists[i] for i in ij]))


def variants(q: Query) -> dict[str, Lists]:
    """Each way of adding (at most) two lists to the original, by name."""
    return {
        "deeper (top 30, no rewrite)": [q.deeper],
        "oracle titles": q.oracle,
        "samples: first two (as served)": q.sample_lists[:2],
        "samples: best two by reward": best_by_reward(q, q.sample_lists, q.novelty),
        "samples: best two by labels": best_by_labels(q, q.sample_lists),
        "expansions: best two by reward": best_by_reward(q, q.expansion_lists, q.expansion_novelty),
        "expansions: best two by labels": best_by_labels(q, q.expansion_lists),
    }


def collect(
    settings: Settings,
    policy: LoadedPolicy,
    args: argparse.Namespace,
    prompt_of: Callable[[str, Sequence[str]], str] | None = None,
) -> list[Query]:
    """The held-out queries with what each variant adds; ``prompt_of(query, titles of its top 30)``, where
    given, is the text the policy samples from instead of the query."""
    setup = heldout_setup(settings, args)
    catalog, m1, search = setup.evaluator.catalog, setup.evaluator.m1, setup.search
    threshold = relevant_above(settings, m1, catalog.dataset)
    k = settings.rewriter.top_k_products

    def relevance(q: str, ps: Sequence[str]) -> list[float]:
        return [float(s) for s in m1.score(q, [catalog.text(p) for p in ps])]

    rewriter = Rewriter(policy, search, settings.rewriter, settings.seed, hints=setup.hints)
    out: list[Query] = []
    for i, query in enumerate(setup.queries):
        relevant = ev.relevant_products(catalog.labelled(query))
        if not relevant:
            continue
        original = search(query)[:k]
        missed = sorted(relevant - set(original))[:2]
        oracle = [
            search(t)[:k]
            for t in oracle_rewrites([catalog.product(p).title for p in missed], args.title_words)
        ]
        deeper = search(query, 3 * k)[: 3 * k]
        titles = [catalog.product(p).title for p in deeper]
        # A hinted version is sampled from the prompt it is served with (the query and its results'
        # words); from the bare query it would be measured on a prompt it never sees.
        prompt = (
            prompt_of(query, titles) if prompt_of else user_message(query, rewriter.hints_for(policy, query))
        )
        texts = sample_texts(policy, query, args.samples, settings, args.seed + i, prompt)
        lists = [search(t)[:k] for t in texts]

        # What best-of-N serving ranks by (rewriter.samples > 2).
        novelty = rewards.list_novelties(query, original, lists, relevance, threshold)
        terms = result_words(query, titles)
        expanded = [search(f"{query} {term}")[:k] for term in terms]
        out.append(
            Query(
                query,
                relevant,
                original,
                deeper,
                oracle,
                texts,
                lists,
                novelty,
                expanded,
                rewards.list_novelties(query, original, expanded, relevance, threshold) if expanded else [],
            )
        )
    return out


def report(name: str, qs: Sequence[Query]) -> None:
    base = float(np.mean([ev.recall(q.original, [], q.relevant).original / len(q.relevant) for q in qs]))
    print(
        f"\n{name}: {len(qs)} held-out queries with judged-relevant products; "
        f"original top 10 recall {base:.3f}"
    )
    print(f"{'added to the original':34s} {'recall':>7s} {'ratio':>6s} {'added':>6s}")
    added = [variants(q) for q in qs]
    for variant in added[0]:
        per = [ev.recall(q.original, a[variant], q.relevant) for q, a in zip(qs, added, strict=True)]
        summary = ev.summarise_recall(per)
        print(f"{variant:34s} {summary.union:7.3f} {summary.ratio:6.3f} {summary.added:6d}")
    reward, labels = "samples: best two by reward", "samples: best two by labels"
    agree = np.mean(
        [union_recall(q, a[reward]) >= union_recall(q, a[labels]) for q, a in zip(qs, added, strict=True)]
    )
    distinct = np.mean([len(q.samples) for q in qs])
    examples = [f"{q.text!r} → {' | '.join(map(repr, q.samples[:2]))}" for q in qs[:4]]
    print("first two samples: " + "; ".join(examples))
    print(
        f"distinct useful samples per query {distinct:.1f}; "
        f"the reward's two recall as much as the labels' two in {agree:.0%}"
    )


def main() -> None:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--run", help="a demo run's directory; default: the default store")
    root.add_argument(
        "--version", default="production", help="id or alias of the version whose samples count"
    )
    root.add_argument("--queries", type=int, default=60, help="labelled held-out queries per data set")
    root.add_argument("--samples", type=int, default=8, help="rewrites sampled per query")
    root.add_argument(
        "--title-words", type=int, default=6, help="words of a judged title an oracle rewrite keeps"
    )
    root.add_argument("--datasets", default="homedepot,crowdflower")
    root.add_argument("--profiles", type=int, default=1, help="(unused here; heldout_setup builds a judge)")
    root.add_argument("--m1-threshold", type=float, default=0.5)
    root.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    root.add_argument("--seed", type=int, default=1234)
    args = root.parse_args()
    base = get_settings()
    run_dir = Path(args.run).expanduser() if args.run else None
    store = open_store(run_settings(base, run_dir) if run_dir else base)
    started = time.perf_counter()
    try:
        version = store.get(int(args.version)) if args.version.isdigit() else store.resolve(args.version)
        policy = load_stored_version(store, version)
    finally:
        store.close()
    set_threads(args.threads)
    print(
        f"version {version.id} of {run_dir or base.db_url}, {args.samples} samples per query; "
        f"{load_average()}"
    )
    for dataset in args.datasets.split(","):
        settings = base.model_copy(update={"dataset": dataset})
        report(dataset, collect(settings, policy, args))
    print(f"\ntotal {time.perf_counter() - started:.0f} s wall; {load_average()}")


if __name__ == "__main__":
    main()
