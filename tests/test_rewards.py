"""Each reward formula against hand-computed values on small lists, and its edge cases."""

from __future__ import annotations

import pytest

from qrloop import rewards
from qrloop.settings import RewardSettings


def test_relevance_is_the_mean_and_zero_for_nothing() -> None:
    assert rewards.relevance([1.0, 0.5, 0.0, 0.5]) == 0.5
    assert rewards.relevance([0.9]) == 0.9
    assert rewards.relevance([1.0, 1.0, 1.0]) == 1.0, "all relevant"
    assert rewards.relevance([]) == 0.0, "a rewrite that retrieves nothing must not look good"


def test_diversity_hand_computed() -> None:
    original = ["a", "b", "c", "d"]
    # |P~| = 4, |P ∩ P~| = 2, |P| = 4 → (4 − 2) / 4
    assert rewards.diversity(original, ["a", "b", "e", "f"]) == 0.5
    # |P~| = 3, |P ∩ P~| = 1 → (3 − 1) / 4
    assert rewards.diversity(original, ["a", "x", "y"]) == 0.5
    assert rewards.diversity(original, ["d"]) == 0.0
    assert rewards.diversity(original, ["a", "b", "c", "d"]) == 0.0, "identical lists add nothing"
    assert rewards.diversity(original, ["d", "c", "b", "a"]) == 0.0, "order does not matter"
    assert rewards.diversity(original, ["w", "x", "y", "z"]) == 1.0
    assert rewards.diversity(original, []) == 0.0
    # a longer rewrite list than the original's can exceed 1: (6 − 0) / 2
    assert rewards.diversity(["a", "b"], ["u", "v", "w", "x", "y", "z"]) == 3.0


def test_diversity_with_an_empty_original() -> None:
    assert rewards.diversity([], ["x", "y"]) == 1.0, "|P| = 0: everything found is new"
    assert rewards.diversity([], []) == 0.0, "|P| = 0 and nothing found: nothing new"


def test_rates() -> None:
    assert rewards.rate(3, 10) == 0.3
    assert rewards.rate(10, 10) == 1.0
    assert rewards.rate(0, 10) == 0.0
    assert rewards.rate(0, 0) == 0.0, "no list shown, no rate"


def test_components_hand_computed() -> None:
    c = rewards.components(["a", "b"], ["a", "c", "d", "e"], [1, 1, 0, 0], clicks=2, add2carts=1, purchases=0)
    # diversity = (4 − 1) / 2 = 1.5; rates over the rewrite's 4 products.
    assert c == rewards.RewardComponents(relevance=0.5, diversity=1.5, click=0.5, add2cart=0.25, purchase=0.0)
    assert c.as_dict() == {
        "relevance": 0.5,
        "diversity": 1.5,
        "click": 0.5,
        "add2cart": 0.25,
        "purchase": 0.0,
    }


def test_components_of_an_empty_rewrite() -> None:
    c = rewards.components(["a", "b"], [], [], clicks=0, add2carts=0, purchases=0)
    assert c == rewards.RewardComponents(0.0, 0.0, 0.0, 0.0, 0.0)
    assert c.combined(RewardSettings()) == 0.0


def test_combined_is_the_weighted_mean() -> None:
    c = rewards.RewardComponents(relevance=0.5, diversity=1.0, click=0.5, add2cart=0.25, purchase=0.0)
    weights = RewardSettings(relevance=2, diversity=0, click=1, add2cart=1, purchase=0, margin=0.0)
    assert c.combined(weights) == pytest.approx((2 * 0.5 + 0.5 + 0.25) / 4)
    # the default weights (1, 0.1, 1, 1, 1): (0.5 + 0.1 + 0.5 + 0.25 + 0) / 4.1
    assert c.combined(RewardSettings()) == pytest.approx(1.35 / 4.1)
    zero = RewardSettings(relevance=0, diversity=0, click=0, add2cart=0, purchase=0)
    assert c.combined(zero) == 0.0, "no weights, no reward (never a division by zero)"


def test_default_weights_never_pay_a_drift_to_irrelevant_but_new_products() -> None:
    # Measured means over 300 training queries (benchmarks/bench_simulators.py): the original query's own
    # top 10 against random catalog products. Random lists are entirely new (d = 1) but irrelevant.
    own_list = rewards.RewardComponents(
        relevance=0.683, diversity=0.0, click=0.106, add2cart=0.04, purchase=0.016
    )
    random_list = rewards.RewardComponents(
        relevance=0.451, diversity=1.0, click=0.039, add2cart=0.009, purchase=0.004
    )
    assert own_list.combined(RewardSettings()) > random_list.combined(RewardSettings())
    # ... while between two equally relevant and engaging lists, the one that shows new products wins.
    new_relevant = rewards.RewardComponents(
        relevance=0.683, diversity=0.6, click=0.106, add2cart=0.04, purchase=0.016
    )
    assert new_relevant.combined(RewardSettings()) > own_list.combined(RewardSettings())


def test_combined_stays_in_unit_interval_at_the_extremes() -> None:
    best = rewards.components(["a"], ["b", "c"], [1, 1], clicks=2, add2carts=2, purchases=2)
    assert best.diversity == 2.0  # two new products against an original of one
    assert best.combined(RewardSettings(diversity=0)) == 1.0, "all relevant, all bought"
    same = rewards.components(["a", "b"], ["a", "b"], [0, 0], clicks=0, add2carts=0, purchases=0)
    assert same.combined(RewardSettings()) == 0.0, "identical, irrelevant, ignored"


def test_preference_and_ties() -> None:
    assert rewards.prefer(0.6, 0.5, margin=0.05) == "first"
    assert rewards.prefer(0.5, 0.6, margin=0.05) == "second"
    assert rewards.prefer(0.52, 0.5, margin=0.05) == "tie"
    assert rewards.prefer(0.75, 0.5, margin=0.25) == "tie", "|diff| = margin is a tie"
    assert rewards.prefer(0.5, 0.5, margin=0.0) == "tie"
    assert rewards.prefer(0.5001, 0.5, margin=0.0) == "first"


def test_coverage_counts_distinct_relevant_products() -> None:
    relevant = {"a", "b", "c"}
    lists = [["a", "x"], ["a", "b"], ["c", "y", "b"]]
    assert rewards.coverage(lists, relevant.__contains__) == 3
    assert rewards.coverage([["x", "y"]], relevant.__contains__) == 0
    assert rewards.coverage([["a"], ["a"]], relevant.__contains__) == 1, "a product counts once"
    assert rewards.coverage([], relevant.__contains__) == 0
