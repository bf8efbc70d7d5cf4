"""What a policy's rewrites are worth on held-out queries, judged by people's labels rather than by the reward
the learner is paid by. Pure functions of rewrites, product lists and labels (``benchmarks/bench_learning.py``
serves the versions and feeds them in; the tests feed hand-made data).

- **echo**: a rewrite that normalises (case, whitespace) to its query adds nothing.
- **human-judged relevant recall**: of the products raters judged relevant for the query (the data set's
  mapped relevance ≥ ``RELEVANT``: Home Depot grade ≥ 2.5 of 1–3), the share in the original query's top k,
  and in the union of the original's and the rewrites' top k. The ratio of the two is what rewriting buys.
- **labelled products shown**, and their mean human grade: how much of each list raters judged, and how well.
- **spelling**: a rewrite corrects a known misspelling when it holds every word the correction changed and
  none of the misspelled words it replaced (so "cordless drill kit" corrects "cordles drill"; "cordles drill"
  does not). ``spelling_signal`` counts the same during a run: known misspellings served, corrected, and
  the pairs that rank a correction against a rewrite that is not one.
- **paired bootstrap**: the mean per-query difference of two policies and its 95% interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from qrloop.data import normalise_query
from qrloop.rewards import is_echo

RELEVANT = 0.75
"""Mapped relevance at or above which a labelled product counts as relevant (Home Depot: grade ≥ 2.5)."""


def echo_rate(queries: Sequence[str], rewrites: Sequence[Sequence[str]]) -> float:
    """Share of all rewrites (every query's, pooled) that normalise to their query."""
    flags = [is_echo(q, r) for q, rs in zip(queries, rewrites, strict=True) for r in rs]
    return float(np.mean(flags)) if flags else float("nan")


def distinct_rewrites(rewrites: Sequence[Sequence[str]]) -> float:
    """Mean number of distinct (normalised) rewrites per query."""
    counts = [len({normalise_query(r) for r in rs}) for rs in rewrites]
    return float(np.mean(counts)) if counts else float("nan")


def mean_length(rewrites: Sequence[Sequence[str]]) -> float:
    """Mean rewrite length in words."""
    lengths = [len(r.split()) for rs in rewrites for r in rs]
    return float(np.mean(lengths)) if lengths else float("nan")


def relevant_products(labels: Mapping[str, float], threshold: float = RELEVANT) -> set[str]:
    """Product ids whose mapped human relevance passes ``threshold``."""
    return {pid for pid, rel in labels.items() if rel >= threshold - 1e-9}


@dataclass(frozen=True)
class Recall:
    """One query: its human-judged relevant products, and how many of them each retrieval found."""

    relevant: int
    original: int  # found in the original query's list
    union: int  # found in the original's list or any rewrite's


def recall(original: Sequence[str], rewrites: Iterable[Sequence[str]], relevant: set[str]) -> Recall:
    shown_by_original = set(original)
    shown = shown_by_original.union(*[set(r) for r in rewrites])
    return Recall(len(relevant), len(shown_by_original & relevant), len(shown & relevant))


@dataclass(frozen=True)
class RecallSummary:
    queries: int  # queries with at least one relevant labelled product
    original: float  # mean per-query recall of the original's list
    union: float  # mean per-query recall of original ∪ rewrites
    added: int  # relevant products the rewrites found beyond the original's, over all queries

    @property
    def ratio(self) -> float:
        return self.union / self.original if self.original > 0 else float("nan")


def summarise_recall(per_query: Sequence[Recall]) -> RecallSummary:
    """Mean per-query recalls over the queries with relevant labelled products (others have none to find)."""
    judged = [r for r in per_query if r.relevant > 0]
    if not judged:
        return RecallSummary(0, float("nan"), float("nan"), 0)
    return RecallSummary(
        len(judged),
        float(np.mean([r.original / r.relevant for r in judged])),
        float(np.mean([r.union / r.relevant for r in judged])),
        sum(r.union - r.original for r in judged),
    )


@dataclass(frozen=True)
class Shown:
    """Labelled products in one list, and their mean human grade (None when the list shows none)."""

    labelled: int
    mean_grade: float | None


def labelled_shown(products: Sequence[str], grades: Mapping[str, float]) -> Shown:
    judged = [grades[p] for p in dict.fromkeys(products) if p in grades]
    return Shown(len(judged), float(np.mean(judged)) if judged else None)


def mean_grade(shown: Sequence[Shown]) -> float:
    """Mean over lists that show labelled products of their mean grade."""
    grades = [s.mean_grade for s in shown if s.mean_grade is not None]
    return float(np.mean(grades)) if grades else float("nan")


def corrects(misspelled: str, corrected: str, rewrite: str) -> bool:
    """Whether ``rewrite`` fixes the misspelling: every word the correction changed is in it, and no word the
    correction replaced is left."""
    wrong, right, got = (set(normalise_query(t).split()) for t in (misspelled, corrected, rewrite))
    fixed, replaced = right - wrong, wrong - right
    if not fixed and not replaced:
        return False  # not a misspelling (the two differ only in case or spacing)
    return fixed <= got and not (replaced & got)


def corrected_share(cases: Sequence[tuple[str, str]], rewrites: Sequence[Sequence[str]]) -> tuple[int, int]:
    """(misspelled queries at least one of whose rewrites corrects them, misspelled queries)."""
    hits = sum(
        any(corrects(wrong, right, r) for r in rs) for (wrong, right), rs in zip(cases, rewrites, strict=True)
    )
    return hits, len(cases)


@dataclass(frozen=True)
class SpellingSignal:
    """What a run could learn about spelling: how often shoppers typed a known misspelling, how often a served
    rewrite corrected it, and which way the pairs built on those queries pointed."""

    misspelled: int  # served queries that are known misspellings
    corrected: int  # ... of which at least one served rewrite corrects the misspelling
    pairs: int  # preference pairs on known misspellings
    chose_fix: int  # ... whose chosen rewrite corrects and whose rejected one does not
    rejected_fix: int  # ... the other way round

    def __str__(self) -> str:
        return (
            f"known misspellings served {self.misspelled}, corrected by a served rewrite {self.corrected}; "
            f"pairs on them {self.pairs}: the correction chosen {self.chose_fix}, "
            f"rejected {self.rejected_fix}"
        )


def spelling_signal(
    corrections: Mapping[str, str],
    served: Iterable[tuple[str, Sequence[str]]],
    pairs: Iterable[tuple[str, str, str]],
) -> SpellingSignal:
    """Count a run's spelling evidence. ``corrections``: normalised misspelled query → its correction;
    ``served``: (query, its served rewrites); ``pairs``: (query, chosen, rejected). A pair teaches the
    correction only when exactly one side corrects: where both or neither do, it ranks something else."""
    misspelled = corrected = 0
    for query, rewrites in served:
        fix = corrections.get(normalise_query(query))
        if fix is not None:
            misspelled += 1
            corrected += any(corrects(query, fix, r) for r in rewrites)
    on_misspelled = chose_fix = rejected_fix = 0
    for query, chosen, rejected in pairs:
        fix = corrections.get(normalise_query(query))
        if fix is None:
            continue
        on_misspelled += 1
        chosen_fixes, rejected_fixes = corrects(query, fix, chosen), corrects(query, fix, rejected)
        chose_fix += chosen_fixes and not rejected_fixes
        rejected_fix += rejected_fixes and not chosen_fixes
    return SpellingSignal(misspelled, corrected, on_misspelled, chose_fix, rejected_fix)


def bootstrap_picks(n: int, seed: int, resamples: int) -> np.ndarray:
    """``resamples`` rows of ``n`` query indices drawn with replacement: the one paired bootstrap both
    ``paired_stats`` and ``paired_ratio_stats`` resample by (the same seed draws the same queries)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_stats(first: np.ndarray, last: np.ndarray, seed: int, resamples: int = 10_000) -> dict[str, float]:
    """Mean of last − first per query, its paired bootstrap 95% CI and the paired t-test's p-value."""
    diff = np.asarray(last, dtype=np.float64) - np.asarray(first, dtype=np.float64)
    boot = diff[bootstrap_picks(len(diff), seed, resamples)].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    p = float(stats.ttest_rel(last, first).pvalue) if len(diff) > 1 and diff.std() > 0 else float("nan")
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "p": p}


def paired_ratio_stats(
    reference: np.ndarray, other: np.ndarray, seed: int, resamples: int = 10_000
) -> dict[str, float]:
    """``mean(other) / mean(reference) − 1`` and its paired bootstrap 95% CI: how a target stated relative to
    a reference ("within 5% of the teacher's reward") is checked. Both means are taken over the same resampled
    queries, so the query-to-query spread both policies share cancels, as in ``paired_stats``."""
    ref = np.asarray(reference, dtype=np.float64)
    oth = np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape or ref.mean() <= 0:
        raise ValueError("paired ratio needs two equal-length score arrays and a positive reference mean")
    picks = bootstrap_picks(len(ref), seed, resamples)
    ratios = oth[picks].mean(axis=1) / np.maximum(ref[picks].mean(axis=1), 1e-12) - 1.0
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": float(oth.mean() / ref.mean() - 1.0), "low": float(low), "high": float(high)}
