"""The held-out evaluation's metric functions (learner/evaluate_online.py) on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from learner.evaluate_online import (
    Recall,
    corrected_share,
    corrects,
    distinct_rewrites,
    echo_rate,
    is_echo,
    labelled_shown,
    mean_grade,
    mean_length,
    paired_ratio_stats,
    paired_stats,
    recall,
    relevant_products,
    spelling_signal,
    summarise_recall,
)


def test_echo_is_the_query_after_case_and_whitespace_normalisation() -> None:
    assert is_echo("Cordless Drill", "  cordless   DRILL ")
    assert not is_echo("cordless drill", "cordless drills")
    queries = ["cordless drill", "angle bracket"]
    rewrites = [["Cordless drill", "dewalt drill"], ["angle bracket", "ANGLE  BRACKET"]]
    assert echo_rate(queries, rewrites) == 3 / 4
    assert distinct_rewrites(rewrites) == (2 + 1) / 2
    assert mean_length(rewrites) == (2 + 2 + 2 + 2) / 4
    assert mean_length([["a b c"], ["d"]]) == 2.0


def test_recall_of_the_union_counts_what_the_rewrites_add() -> None:
    labels = {"p1": 1.0, "p2": 0.75, "p3": 0.5, "p4": 1.0, "p5": 0.0}
    relevant = relevant_products(labels)
    assert relevant == {"p1", "p2", "p4"}, "0.75 (grade 2.5 on 1-3) is the threshold, inclusive"
    one = recall(["p1", "p3", "x"], [["p2", "p1"], ["y"]], relevant)
    assert one == Recall(relevant=3, original=1, union=2)
    none_relevant = recall(["p1"], [["p2"]], set())
    echo = recall(["p4", "z"], [["p4", "z"]], {"p4", "p9"})
    summary = summarise_recall([one, none_relevant, echo])
    assert summary.queries == 2, "a query without relevant labelled products has nothing to find"
    assert summary.original == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert summary.union == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert summary.added == 1
    assert summary.ratio == pytest.approx((2 / 3 + 1 / 2) / (1 / 3 + 1 / 2))
    assert np.isnan(summarise_recall([none_relevant]).ratio)


def test_labelled_products_shown_and_their_mean_grade() -> None:
    grades = {"p1": 3.0, "p2": 2.0, "p3": 1.0}
    shown = labelled_shown(["p1", "x", "p2", "p1"], grades)
    assert shown.labelled == 2 and shown.mean_grade == 2.5, "a product listed twice counts once"
    nothing = labelled_shown(["x", "y"], grades)
    assert nothing.labelled == 0 and nothing.mean_grade is None
    assert mean_grade([shown, nothing, labelled_shown(["p3"], grades)]) == pytest.approx((2.5 + 1.0) / 2)


def test_a_rewrite_corrects_a_misspelling_when_it_has_the_fixed_words_and_not_the_wrong_ones() -> None:
    assert corrects("cordles drill", "cordless drill", "cordless drill")
    assert corrects("cordles drill", "cordless drill", "Cordless Drill kit"), "extra words are fine"
    assert not corrects("cordles drill", "cordless drill", "cordles drill"), "the echo corrects nothing"
    assert not corrects("cordles drill", "cordless drill", "cordless cordles drill")
    assert not corrects("cordles drill", "cordless drill", "drill"), "dropping the typo is not fixing it"
    assert not corrects("sheet meatal", "Sheet  Meatal", "sheet meatal"), "only a case change: not a case"
    cases = [("cordles drill", "cordless drill"), ("bulk calking", "bulk caulking")]
    assert corrected_share(cases, [["cordles drill", "cordless drill"], ["bulk calking"]]) == (1, 2)


def test_the_spelling_signal_counts_only_pairs_where_exactly_one_side_corrects() -> None:
    corrections = {"cordles drill": "cordless drill", "bulk calking": "bulk caulking"}
    served = [
        ("Cordles  Drill", ["cordless drill", "drill kit"]),  # a known misspelling, corrected
        ("bulk calking", ["bulk calking tube", "caulk"]),  # a known misspelling, not corrected
        ("angle bracket", ["corner brace", "angle iron"]),  # spelled right: not counted
    ]
    pairs = [
        ("cordles drill", "cordless drill", "drill kit"),  # teaches the fix
        ("cordles drill", "drill kit", "cordless drill kit"),  # teaches against it
        ("cordles drill", "cordless drill", "cordless drills"),  # both correct: ranks something else
        ("bulk calking", "caulk", "bulk calking tube"),  # neither corrects
        ("angle bracket", "corner brace", "angle iron"),  # not a misspelling
    ]
    signal = spelling_signal(corrections, served, pairs)
    assert (signal.misspelled, signal.corrected) == (2, 1)
    assert (signal.pairs, signal.chose_fix, signal.rejected_fix) == (4, 1, 1)
    assert "corrected by a served rewrite 1" in str(signal)


def test_paired_bootstrap_brackets_a_known_shift_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    first = rng.normal(0.5, 0.1, 200)
    shifted = paired_stats(first, first + 0.05 + rng.normal(0, 0.01, 200), seed=1)
    assert shifted["low"] < 0.05 < shifted["high"] and shifted["low"] > 0
    noise = paired_stats(first, first + rng.normal(0, 0.01, 200), seed=1)
    assert noise["low"] < 0 < noise["high"]
    same = paired_stats(first, first, seed=1)
    assert same["mean"] == 0 and np.isnan(same["p"])


def test_paired_ratio_brackets_a_known_relative_shift() -> None:
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.05, 0.25, 300)
    student = teacher * 0.92 + rng.normal(0, 0.005, 300)  # 8% behind, per query
    behind = paired_ratio_stats(teacher, student, seed=1)
    assert behind["ratio"] == pytest.approx(student.mean() / teacher.mean() - 1)
    assert behind["low"] < -0.08 < behind["high"] < -0.05, "8% behind is told apart from 'within 5%'"
    same = paired_ratio_stats(teacher, teacher, seed=1)
    assert same["ratio"] == same["low"] == same["high"] == 0
    with pytest.raises(ValueError, match="positive reference"):
        paired_ratio_stats(np.zeros(3), np.ones(3), seed=1)
