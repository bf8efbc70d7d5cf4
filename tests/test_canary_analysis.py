"""The canary's sequential rule on synthetic streams whose truth is known (pure, seeded, fast).

Each simulated canary looks every 20 queries per arm, as often as the job might, until a verdict or the
rule's budget; the properties are over hundreds of canaries each. Rewards are normal around the paper's scalar
(mean 0.2) or gain-like (``gain_rewards``: mean ~0.012, 44% exact zeros, a long tail, as the demo's outcomes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from qrloop.canary import (
    Analysis,
    ArmSamples,
    ArmStats,
    CanaryPolicy,
    Moments,
    analyse,
    analyse_stats,
    design_tau,
    half_width,
    next_share,
    queries_for_power,
)

POLICY = CanaryPolicy(max_queries=400, max_analyses=1000)
SD = 0.06  # per-query reward spread, about bench_canary's scalar pool
PER_LOOK = 20
TRIALS = 600
Rewards = Callable[[np.random.Generator, float, int], np.ndarray]  # (rng, shift, n) → n rewards


def normal_rewards(rng: np.random.Generator, shift: float, n: int) -> np.ndarray:
    return rng.normal(0.2 + shift, SD, n)


def gain_rewards(rng: np.random.Generator, lift: float, n: int) -> np.ndarray:
    """The gain's shape (bench_canary's gain generator): 44% exact zeros, else a Gamma, mean ~0.012; a
    candidate ``lift`` better earns that much more on every query (zeros stay zeros)."""
    earned = rng.random(n) >= 0.44
    return np.where(earned, rng.gamma(0.74, 0.029, n), 0.0) * (1 + lift)


def running(values: np.ndarray, per_look: int = PER_LOOK) -> list[Moments]:
    """The moments after every look (cumulative), vectorised."""
    n = np.arange(1, len(values) + 1)
    sums, squares = np.cumsum(values), np.cumsum(values**2)
    means = sums / n
    variances = np.where(n > 1, (squares - n * means**2) / np.maximum(n - 1, 1), 0.0)
    looks = range(per_look, len(values) + 1, per_look)
    return [Moments(k, float(means[k - 1]), float(variances[k - 1])) for k in looks]


def simulate(
    rng: np.random.Generator,
    effect: float,
    policy: CanaryPolicy = POLICY,
    relevance_drop: float = 0.0,
    kl_mean: float = 0.3,
    rewards: Rewards = normal_rewards,
    production_per_canary: int = 1,
) -> tuple[str, str | None, int]:
    """One canary: (verdict, which test called it worse, canary queries at the verdict). Each look adds
    PER_LOOK canary queries and ``production_per_canary`` times as many production ones; the reward test's
    spread is passed back from analysis to analysis, as the job keeps it."""
    n = policy.max_queries
    arms = []
    for shift, rel_shift, ratio in ((0.0, 0.0, production_per_canary), (effect, -relevance_drop, 1)):
        size, per_look = n * ratio, PER_LOOK * ratio
        relevance = rng.normal(0.6 + rel_shift, 0.18, size)
        arms.append((running(rewards(rng, shift, size), per_look), running(relevance, per_look)))
    kl = running(rng.normal(kl_mean, 1.0, n))
    nan = Moments(0, float("nan"), float("nan"))
    tau = None
    for look in range(len(kl)):
        production = ArmStats(arms[0][0][look], arms[0][1][look], nan)
        canary = ArmStats(arms[1][0][look], arms[1][1][look], kl[look])
        analysis = analyse_stats(production, canary, policy, look, tau)
        if analysis.verdict != "continue":
            return analysis.verdict, analysis.worse_by, analysis.n_canary
        tau = analysis.reward_tau
    raise AssertionError("the budget always ends a canary")


def rates(results: list[tuple[str, str | None, int]]) -> dict[str, float]:
    return {
        v: sum(r[0] == v for r in results) / len(results) for v in ("promote", "rollback", "inconclusive")
    }


def test_identical_arms_get_a_false_verdict_at_most_alpha_of_the_time_however_often_it_looks() -> None:
    rng = np.random.default_rng(1)
    results = [simulate(rng, 0.0) for _ in range(TRIALS)]
    got = rates(results)
    false_verdicts = got["promote"] + got["rollback"]
    assert false_verdicts <= POLICY.alpha, got
    assert got["inconclusive"] >= 1 - POLICY.alpha, "identical candidates end inconclusive, not worse"


def test_a_fixed_sample_test_repeated_at_the_same_looks_would_exceed_alpha() -> None:
    """The control: the same streams judged by a plain 95% z interval at every look (what re-running a
    fixed-sample test amounts to) cross far more often; the sequence's width is what prevents it."""
    rng = np.random.default_rng(2)
    naive = POLICY
    crossed = 0
    for _ in range(300):
        p = running(rng.normal(0.2, SD, naive.max_queries))
        c = running(rng.normal(0.2, SD, naive.max_queries))
        for mp, mc in zip(p, c, strict=True):
            se = np.sqrt(mp.var / mp.n + mc.var / mc.n)
            if abs(mc.mean - mp.mean) > 1.96 * se:
                crossed += 1
                break
    assert crossed / 300 > 2 * POLICY.alpha


def test_ten_percent_better_is_promoted_with_at_least_80_percent_power_within_the_budget() -> None:
    rng = np.random.default_rng(3)
    results = [simulate(rng, 0.02) for _ in range(TRIALS)]
    got = rates(results)
    assert got["promote"] >= 0.8, got
    assert got["rollback"] == 0.0, "a better candidate is never called worse"


def test_ten_percent_worse_is_rolled_back_as_worse_by_the_reward_test() -> None:
    rng = np.random.default_rng(4)
    results = [simulate(rng, -0.02) for _ in range(TRIALS)]
    got = rates(results)
    assert got["rollback"] >= 0.8 and got["promote"] == 0.0, got
    assert {worse_by for verdict, worse_by, _ in results if verdict == "rollback"} == {"reward"}


def test_reward_hacking_is_rolled_back_by_the_relevance_guard_even_with_more_reward() -> None:
    """More reward bought with 25% less relevance (beyond the 10% margin): never promoted."""
    rng = np.random.default_rng(5)
    results = [simulate(rng, 0.03, relevance_drop=0.15) for _ in range(200)]
    assert rates(results)["promote"] == 0.0
    assert sum(r[1] == "relevance" for r in results) / len(results) >= 0.95


def test_a_canary_far_from_production_is_rolled_back_by_the_kl_guard() -> None:
    rng = np.random.default_rng(6)
    results = [simulate(rng, 0.03, kl_mean=POLICY.max_kl + 2) for _ in range(200)]
    assert rates(results)["promote"] == 0.0
    assert all(r[1] == "kl" for r in results)


def test_queries_for_power_is_enough_for_the_rule_as_simulated() -> None:
    """At the count ``queries_for_power`` gives for equal arms, the simulated rule promotes ≥ 80%."""
    n = queries_for_power(0.10, 0.2, SD, POLICY, relevance=(0.6, 0.18))  # +10%: +0.02
    budget = replace(POLICY, max_queries=(n // PER_LOOK + 1) * PER_LOOK)
    rng = np.random.default_rng(7)
    results = [simulate(rng, 0.02, budget) for _ in range(500)]
    assert rates(results)["promote"] >= 0.8
    reward_only = queries_for_power(0.10, 0.2, SD, POLICY)
    assert reward_only < n, "the relevance guard's non-inferiority takes its own queries"
    assert queries_for_power(0.05, 0.2, SD, POLICY) > 3 * reward_only, "half the effect: about 4x the queries"
    assert queries_for_power(0.10, 0.2, SD, POLICY, production_per_canary=3) < reward_only


def test_the_interval_narrows_with_evidence_and_is_wider_than_a_fixed_sample_one() -> None:
    widths = [half_width(SD * np.sqrt(2 / n), 0.02, 0.04) for n in (50, 200, 800, 3200)]
    assert widths == sorted(widths, reverse=True)
    assert all(w > 1.96 * SD * np.sqrt(2 / n) for w, n in zip(widths, (50, 200, 800, 3200), strict=True))


def test_too_few_samples_keeps_collecting_and_says_so() -> None:
    arm = ArmSamples(rewards=[0.5] * 10, relevance=[0.6] * 10)
    result = analyse(arm, arm, POLICY)
    assert result.verdict == "continue" and "need 30" in result.reason and not result.tested


def test_out_of_budget_is_inconclusive_not_worse() -> None:
    rng = np.random.default_rng(8)
    arm = ArmSamples(rewards=list(rng.normal(0.2, SD, 100)), relevance=list(rng.normal(0.6, 0.18, 100)))
    other = ArmSamples(rewards=list(rng.normal(0.2, SD, 100)), relevance=list(rng.normal(0.6, 0.18, 100)))
    by_queries = analyse(arm, other, replace(POLICY, max_queries=100))
    assert by_queries.verdict == "inconclusive" and "100 canary queries" in by_queries.reason
    by_analyses = analyse(arm, other, replace(POLICY, max_analyses=5), analyses_so_far=4)
    assert by_analyses.verdict == "inconclusive" and "5 analyses" in by_analyses.reason


def test_alpha_must_leave_room_for_the_reward_test() -> None:
    with pytest.raises(ValueError, match="guard_alpha"):
        CanaryPolicy(alpha=0.01, guard_alpha=0.005)


def test_traffic_share_steps() -> None:
    steps = [0.1, 0.25, 0.5]
    assert next_share(0.1, steps) == 0.25
    assert next_share(0.25, steps) == 0.5
    assert next_share(0.5, steps) == 0.5


def test_power_command_prints_what_queries_for_power_computes() -> None:
    from typer.testing import CliRunner

    from qrloop.canary_job import policy_of
    from qrloop.cli.main import app
    from qrloop.settings import get_settings

    shown = CliRunner().invoke(app, ["canary", "power", "--effect", "0.1"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    policy = policy_of(get_settings().canary)
    expected = queries_for_power(0.10, 0.012, 0.021, policy, relevance=(0.31, 0.15))
    assert f"equal arms (share 0.5): {expected} canary queries for 80% power at +10%" in shown.stdout
    assert f"canary.max_queries is {policy.max_queries}" in shown.stdout


# ------------------------------------------------------------------------- relative tuning, gain-like rewards


def test_identical_arms_with_gain_like_rewards_get_a_false_verdict_at_most_alpha_of_the_time() -> None:
    """The gain DPO ranks by: mostly zeros and a long tail, so the plug-in variances are noisiest exactly
    where the spread is estimated (the first tested look). Production has 3x the canary's queries, as at
    share 0.25, and the canary runs 2,000 queries (100 looks): still at most alpha, counting both kinds."""
    long = replace(POLICY, max_queries=2000)
    rng = np.random.default_rng(11)
    results = [simulate(rng, 0.0, long, rewards=gain_rewards, production_per_canary=3) for _ in range(TRIALS)]
    got = rates(results)
    assert got["promote"] + got["rollback"] <= POLICY.alpha, got


def test_a_gain_like_candidate_25_percent_better_is_promoted_within_what_queries_for_power_says() -> None:
    draws = gain_rewards(np.random.default_rng(12), 0.0, 200_000)
    mean = float(draws.mean())
    # The lift scales the canary's spread too: the power function's one sd is the arms' RMS.
    sd = float(draws.std()) * np.sqrt((1 + 1.25**2) / 2)
    n = queries_for_power(0.25, mean, sd, POLICY, relevance=(0.6, 0.18))
    assert 1000 < n < 3000, "the gain's spread (sd/mean ~1.8) needs thousands of queries for +25%"
    budget = replace(POLICY, max_queries=(n // PER_LOOK + 1) * PER_LOOK)
    rng = np.random.default_rng(13)
    results = [simulate(rng, 0.25, budget, rewards=gain_rewards) for _ in range(300)]
    assert rates(results)["promote"] >= 0.8, rates(results)
    assert rates(results)["rollback"] == 0.0


def test_the_reward_tests_spread_is_fixed_by_the_first_tested_analysis_from_the_pooled_mean() -> None:
    rng = np.random.default_rng(14)

    def arm(mean: float, n: int) -> ArmSamples:
        return ArmSamples(rewards=list(rng.normal(mean, SD, n)), relevance=list(rng.normal(0.6, 0.18, n)))

    production, canary = arm(0.2, 90), arm(0.2, 30)
    too_few = analyse(production, arm(0.2, 10), POLICY)
    assert too_few.reward_tau is None, "no spread before the first tested analysis"
    first = analyse(production, canary, POLICY)
    pooled = (sum(production.rewards) + sum(canary.rewards)) / 120
    assert first.reward_tau == pytest.approx(POLICY.design_lift * pooled)
    # Later analyses keep it, whatever the mean does meanwhile (re-estimating it would void the guarantee).
    later = analyse(arm(0.5, 200), arm(0.5, 100), POLICY, 1, first.reward_tau)
    assert later.reward_tau == first.reward_tau
    assert design_tau(0.0, POLICY) > 0, "a production that earns nothing still gets a spread (MIN_TAU)"


def test_the_tuning_is_relative_rewards_scaled_by_a_factor_get_the_same_verdicts_and_scaled_intervals() -> (
    None
):
    """The same +10% candidate on the paper's scalar (mean 0.2) and on rewards 0.05x as large (mean 0.01,
    the gain's scale), look by look: the same verdicts, the same spread relative to the mean, and intervals
    scaled by exactly 0.05. (With an absolute spread, 0.02, the small scale's intervals were tuned for
    +200% and came out wider than 0.05x: later verdicts.)"""
    rng = np.random.default_rng(15)
    factor = 0.05
    production, canary = rng.normal(0.2, SD, 2000), rng.normal(0.22, SD, 2000)
    relevance = [running(rng.normal(0.6, 0.18, 2000)) for _ in range(2)]
    nan = Moments(0, float("nan"), float("nan"))

    def looks(scale: float) -> list[Analysis]:
        """Every analysis until the verdict, the spread passed back as the job does."""
        seen: list[Analysis] = []
        arms = zip(running(production * scale), running(canary * scale), *relevance, strict=True)
        for look, (p, c, rel_p, rel_c) in enumerate(arms):
            tau = seen[-1].reward_tau if seen else None
            seen.append(analyse_stats(ArmStats(p, rel_p, nan), ArmStats(c, rel_c, nan), POLICY, look, tau))
            if seen[-1].verdict != "continue":
                break
        return seen

    full, scaled = looks(1.0), looks(factor)
    assert [a.verdict for a in full] == [a.verdict for a in scaled]
    assert full[-1].verdict == "promote" and len(full) > 3, "a real sequence of looks, then a verdict"
    for big, small in zip(full, scaled, strict=True):
        for name in ("reward_tau", "effect_low", "effect_high"):
            value, scaled_value = getattr(big, name), getattr(small, name)
            assert (value is None) == (scaled_value is None), name
            if value is not None:
                assert scaled_value == pytest.approx(factor * value, rel=1e-9), name
    assert queries_for_power(0.10, 0.2, SD, POLICY) == queries_for_power(
        0.10, factor * 0.2, factor * SD, POLICY
    )
