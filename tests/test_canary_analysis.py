"""The canary's verdicts as a pure function of the two arms' samples."""

from __future__ import annotations

import numpy as np

from qrloop.canary import ArmSamples, CanaryPolicy, analyse, next_share

POLICY = CanaryPolicy(min_samples=30, alpha=0.05, min_effect=0.02, relevance_floor=0.95, max_kl=5.0)


def arm(
    mean_reward: float, mean_relevance: float, n: int = 200, seed: int = 0, kl: float = 0.5
) -> ArmSamples:
    rng = np.random.default_rng(seed)
    return ArmSamples(
        rewards=list(np.clip(rng.normal(mean_reward, 0.1, n), 0, 1)),
        relevance=list(np.clip(rng.normal(mean_relevance, 0.05, n), 0, 1)),
        kl_to_reference=list(np.abs(rng.normal(kl, 0.1, n))),
    )


def test_too_few_samples_keeps_collecting() -> None:
    result = analyse(arm(0.5, 0.6, n=10), arm(0.9, 0.6, n=10, seed=1), POLICY)
    assert result.verdict == "continue" and "need 30" in result.reason


def test_clearly_better_canary_is_promoted() -> None:
    result = analyse(arm(0.40, 0.6), arm(0.50, 0.6, seed=1), POLICY)
    assert result.verdict == "promote"
    assert result.p_value is not None and result.p_value < 0.05
    assert result.effect > 0.05


def test_clearly_worse_canary_is_rolled_back() -> None:
    result = analyse(arm(0.50, 0.6), arm(0.30, 0.6, seed=1), POLICY)
    assert result.verdict == "rollback" and "worse" in result.reason


def test_reward_hacking_canary_is_stopped_by_the_relevance_guard() -> None:
    # More reward (clicks) but relevance down to ~70% of production's.
    result = analyse(arm(0.40, 0.6), arm(0.60, 0.42, seed=1), POLICY)
    assert result.verdict == "rollback" and "relevance guard" in result.reason


def test_canary_far_from_its_reference_is_stopped_by_the_kl_guard() -> None:
    result = analyse(arm(0.40, 0.6), arm(0.60, 0.6, seed=1, kl=12.0), POLICY)
    assert result.verdict == "rollback" and "KL guard" in result.reason


def test_indistinguishable_arms_keep_collecting_then_give_up() -> None:
    same_p, same_c = arm(0.5, 0.6), arm(0.5, 0.6, seed=1)
    assert analyse(same_p, same_c, POLICY).verdict == "continue"
    assert analyse(same_p, same_c, POLICY, windows_so_far=POLICY.max_windows - 1).verdict == "rollback"


def test_traffic_share_steps() -> None:
    steps = [0.1, 0.25, 0.5]
    assert next_share(0.1, steps) == 0.25
    assert next_share(0.25, steps) == 0.5
    assert next_share(0.5, steps) == 0.5
