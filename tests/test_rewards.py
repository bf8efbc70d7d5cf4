"""Each reward formula against hand-computed values, and its edge cases."""

from __future__ import annotations

import pytest

from qrloop import rewards
from qrloop.settings import RewardSettings


def test_relevance_is_the_mean_and_zero_for_nothing() -> None:
    assert rewards.relevance([1.0, 0.5, 0.0, 0.5]) == 0.5
    assert rewards.relevance([]) == 0.0


def test_diversity_hand_computed() -> None:
    original = ["a", "b", "c", "d"]
    assert rewards.diversity(original, ["a", "b", "e", "f"]) == 0.5
    assert rewards.diversity(original, ["a", "b", "c", "d"]) == 0.0, "identical lists add nothing"
    assert rewards.diversity(original, ["w", "x", "y", "z"]) == 1.0
    assert rewards.diversity(original, []) == 0.0
    assert rewards.diversity([], ["x"]) == 1.0, "|P| = 0: everything found is new"
    assert rewards.diversity([], []) == 0.0


def test_rates() -> None:
    assert rewards.rate(3, 10) == 0.3
    assert rewards.rate(0, 0) == 0.0


def test_components_and_weighted_combination() -> None:
    c = rewards.components(["a", "b"], ["a", "c", "d", "e"], [1, 1, 0, 0], clicks=2, add2carts=1, purchases=0)
    assert c == rewards.RewardComponents(relevance=0.5, diversity=1.5, click=0.5, add2cart=0.25, purchase=0.0)
    weights = RewardSettings(relevance=2, diversity=0, click=1, add2cart=1, purchase=0, margin=0.0)
    assert c.combined(weights) == pytest.approx((2 * 0.5 + 0.5 + 0.25) / 4)
    all_relevant = rewards.components(["a"], ["a", "b"], [1, 1], clicks=2, add2carts=2, purchases=2)
    assert all_relevant.combined(RewardSettings(diversity=0)) == 1.0


def test_preference_and_ties() -> None:
    assert rewards.prefer(0.6, 0.5, margin=0.05) == "first"
    assert rewards.prefer(0.5, 0.6, margin=0.05) == "second"
    assert rewards.prefer(0.52, 0.5, margin=0.05) == "tie"


def test_coverage_counts_distinct_relevant_products() -> None:
    relevant = {"a", "b", "c"}
    lists = [["a", "x"], ["a", "b"], ["c", "y", "b"]]
    assert rewards.coverage(lists, relevant.__contains__) == 3
    assert rewards.coverage([], relevant.__contains__) == 0
