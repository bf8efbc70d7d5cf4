"""Off-policy estimators on synthetic logs whose true values are known analytically."""

from __future__ import annotations

import numpy as np
import pytest

from learner import ope


def synthetic_log(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Two actions; the logging policy picks action 1 with p=0.5, the candidate with p=0.8.

    Action 1 pays Bernoulli(0.7), action 0 pays Bernoulli(0.2): the candidate's true value is
    0.8·0.7 + 0.2·0.2 = 0.60 (the logging policy's is 0.45).
    """
    rng = np.random.default_rng(seed)
    actions = rng.random(n) < 0.5
    rewards = np.where(actions, rng.random(n) < 0.7, rng.random(n) < 0.2).astype(float)
    logp_b = np.log(np.full(n, 0.5))
    logp_c = np.log(np.where(actions, 0.8, 0.2))
    return rewards, logp_c, logp_b, 0.60


def test_ips_and_snips_cover_the_true_value() -> None:
    rewards, logp_c, logp_b, truth = synthetic_log(4000)
    est = ope.estimate(rewards, logp_c, logp_b)
    assert est.ips_ci[0] <= truth <= est.ips_ci[1]
    assert est.snips_ci[0] <= truth <= est.snips_ci[1]
    assert abs(est.snips - truth) < 0.03
    assert est.warning is None
    assert 0.5 * est.n < est.ess < est.n


def test_intervals_cover_at_about_the_nominal_rate() -> None:
    covered = 0
    for seed in range(100):
        rewards, logp_c, logp_b, truth = synthetic_log(500, seed)
        est = ope.estimate(rewards, logp_c, logp_b)
        covered += est.snips_ci[0] <= truth <= est.snips_ci[1]
    assert covered >= 88, f"95% intervals covered the truth only {covered}/100 times"


def test_serving_policy_evaluated_on_its_own_log_equals_the_logged_mean() -> None:
    rewards, _, logp_b, _ = synthetic_log(300)
    est = ope.estimate(rewards, logp_b, logp_b)
    assert est.ips == pytest.approx(rewards.mean())
    assert est.snips == pytest.approx(rewards.mean())
    assert est.ess == pytest.approx(300)


def test_heavy_tailed_weights_are_flagged() -> None:
    rewards = np.ones(100)
    logp_b = np.zeros(100)
    logp_c = np.full(100, -10.0)
    logp_c[0] = 5.0  # one sample the candidate loves and the logger almost never produced
    est = ope.estimate(rewards, logp_c, logp_b)
    assert est.warning is not None and "heavy-tailed" in est.warning
    assert est.ess < 2


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ope.estimate([], [], [])
    with pytest.raises(ValueError, match="same length"):
        ope.estimate([1.0], [0.0, 0.0], [0.0])
