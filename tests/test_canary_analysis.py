"""The canary's sequential rule on synthetic streams whose truth is known (pure, seeded, fast).

Each simulated canary looks every 20 queries per arm, as often as the job might, until a verdict or the
rule's budget; the properties are over hundreds of canaries each.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from qrloop.canary import (
    ArmSamples,
    ArmStats,
    CanaryPolicy,
    Moments,
    analyse,
    analyse_stats,
    half_width,
    next_share,
    queries_for_power,
)

POLICY = CanaryPolicy(max_queries=400, max_analyses=1000)
SD = 0.06  # per-query reward spread, about bench_canary's pool
PER_LOOK = 20
TRIALS = 600


def running(values: np.ndarray) -> list[Moments]:
    """The moments after every look (cumulative), vectorised."""
    n = np.arange(1, len(values) + 1)
    sums, squares = np.cumsum(values), np.cumsum(values**2)
    means = sums / n
    variances = np.where(n > 1, (squares - n * means**2) / np.maximum(n - 1, 1), 0.0)
    looks = range(PER_LOOK, len(values) + 1, PER_LOOK)
    return [Moments(k, float(means[k - 1]), float(variances[k - 1])) for k in looks]


def simulate(
    rng: np.random.Generator,
    effect: float,
    policy: CanaryPolicy = POLICY,
    relevance_drop: float = 0.0,
    kl_mean: float = 0.3,
) -> tuple[str, str | None, int]:
    """One canary: (verdict, which test called it worse, canary queries at the verdict)."""
    n = policy.max_queries
    arms = []
    for shift, rel_shift in ((0.0, 0.0), (effect, -relevance_drop)):
        rewards = rng.normal(0.2 + shift, SD, n)
        relevance = rng.normal(0.6 + rel_shift, 0.18, n)
        arms.append((running(rewards), running(relevance)))
    kl = running(rng.normal(kl_mean, 1.0, n))
    nan = Moments(0, float("nan"), float("nan"))
    for look in range(len(kl)):
        production = ArmStats(arms[0][0][look], arms[0][1][look], nan)
        canary = ArmStats(arms[1][0][look], arms[1][1][look], kl[look])
        analysis = analyse_stats(production, canary, policy, look)
        if analysis.verdict != "continue":
            return analysis.verdict, analysis.worse_by, analysis.n_canary
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
    n = queries_for_power(0.02, SD, POLICY, relevance=(0.6, 0.18))
    budget = replace(POLICY, max_queries=(n // PER_LOOK + 1) * PER_LOOK)
    rng = np.random.default_rng(7)
    results = [simulate(rng, 0.02, budget) for _ in range(500)]
    assert rates(results)["promote"] >= 0.8
    reward_only = queries_for_power(0.02, SD, POLICY)
    assert reward_only < n, "the relevance guard's non-inferiority takes its own queries"
    assert queries_for_power(0.01, SD, POLICY) > 3 * reward_only, "half the effect: about 4x the queries"
    assert queries_for_power(0.02, SD, POLICY, production_per_canary=3) < reward_only


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
    expected = queries_for_power(0.02, 0.064, policy, relevance=(0.63, 0.19))
    assert f"equal arms (share 0.5): {expected} canary queries for 80% power at +10%" in shown.stdout
    assert f"canary.max_queries is {policy.max_queries}" in shown.stdout
