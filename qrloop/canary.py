"""Canary analysis as an always-valid sequential test: promote, roll back as worse, or keep collecting.

The canary job looks at the evidence every ``interval_s`` for as long as a candidate is live. A fixed-sample
test re-run at every look (the Mann–Whitney U test this replaced) rejects a candidate identical to production
most of the time, because every look is another chance for noise to cross the line. Here every quantity is
judged by a **confidence sequence**: an interval that holds at *all* looks at once with probability ≥ 1 − α,
so stopping the first time it excludes a value keeps the error rate ≤ α however often the job looks.

The interval is the normal-mixture boundary of Robbins (1970), in the form of Howard et al. (2021, "Time-
uniform, nonparametric, nonasymptotic confidence sequences", eq. 14) and Johari et al.'s mSPRT (the sequential
test of Optimizely's Stats Engine), with the variance estimated from the data, which makes it an *asymptotic*
confidence sequence (Waudby-Smith et al., 2021, "Time-uniform central limit theory"): for an estimate with
standard error ``se`` and a mixture tuned to effects of size ``tau``, with ``r = tau² / se²``,

    half-width = se · sqrt((1 + r) / r · (ln(1 + r) + 2 ln(1 / α)))

A difference of two arms' cumulative means is a Brownian motion in its information 1/se² whatever the arms'
sizes at each look, so the traffic share may step up between looks without breaking the guarantee.

The reward test's ``tau`` is *relative*: ``design_lift`` (+10%) of the mean reward per query, so the same
rule fits the paper's scalar (mean ~0.20) and the gain DPO ranks by (mean ~0.013, mostly zeros) alike. The
mean is estimated once, at the candidate's first tested analysis (both arms pooled), and ``tau`` is fixed
from then on (``Analysis.reward_tau``; the job keeps it in the audit log). See ``design_tau`` for why that
keeps the guarantee, where re-estimating it at every look would not.

The decision on the two arms' samples since the candidate went live:

1. **Enough data?** Each arm needs ``min_samples`` (the variance estimates are plug-ins), else *continue*.
2. **Guards**, non-inferiority tests, each with its own confidence sequence at ``guard_alpha``:
   - relevance: canary mean relevance − (1 − ``relevance_margin``) × production's. Its interval entirely
     below 0 → *roll back as worse* (reward hacking: clicks bought with off-intent products); entirely above
     0 → non-inferiority shown, which a promotion requires.
   - KL: the canary's mean per-query log-ratio to production (log π_canary − log π_production of its own
     rewrites). Entirely above ``max_kl`` → *roll back as worse*; entirely below → shown within the bound.
     A stream that logs no log-ratios has no KL guard (said so in the analysis).
3. **Reward**: the confidence sequence on canary − production mean reward at ``alpha − 2·guard_alpha``,
   tuned to ``tau`` = ``design_lift`` × the mean reward at the first tested analysis. Entirely below 0 →
   *roll back as worse*; entirely above 0 with both guards shown → *promote*.
4. **Inconclusive**: after ``max_queries`` canary queries or ``max_analyses`` analyses without a verdict,
   production is kept and the candidate archived: not better as far as the canary could tell, and not
   called worse either.

A false verdict needs one of the three sequences to miss its true value at some look, so by the union bound
the chance of any false verdict over the whole canary is ≤ ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

Verdict = Literal["promote", "continue", "rollback", "inconclusive"]
# The smallest mixture spread (metric units) any interval is tuned to: it binds only when the mean it is a
# fraction of is (nearly) zero, e.g. a production that earns nothing; a gain-like reward's +10% (~0.001) is
# well above it.
MIN_TAU = 1e-4


@dataclass(frozen=True)
class CanaryPolicy:
    """The decision rule's parameters (``CanarySettings`` documents each)."""

    min_samples: int = 30
    alpha: float = 0.05
    guard_alpha: float = 0.005
    design_lift: float = 0.10
    relevance_margin: float = 0.10
    max_kl: float = 5.0
    max_queries: int = 12_000
    max_analyses: int = 240

    @property
    def reward_alpha(self) -> float:
        """The reward test's share of ``alpha``; each guard has ``guard_alpha`` (union bound)."""
        return self.alpha - 2 * self.guard_alpha

    def __post_init__(self) -> None:
        if not (self.guard_alpha > 0 and self.reward_alpha > 0):
            raise ValueError(
                f"need 0 < 2·guard_alpha < alpha; got alpha={self.alpha}, guard_alpha={self.guard_alpha}"
            )
        if self.design_lift <= 0 or self.max_kl <= 0 or not 0 < self.relevance_margin < 1:
            raise ValueError("design_lift and max_kl must be positive, relevance_margin in (0, 1)")


@dataclass(frozen=True)
class ArmSamples:
    rewards: Sequence[float]
    relevance: Sequence[float]
    kl_to_reference: Sequence[float] = ()


@dataclass(frozen=True)
class Moments:
    """Count, mean and (unbiased) variance of one metric of one arm: all the rule needs of the samples."""

    n: int
    mean: float
    var: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        n = len(values)
        if n == 0:
            return cls(0, float("nan"), float("nan"))
        array = np.asarray(values, dtype=float)
        return cls(n, float(array.mean()), float(array.var(ddof=1)) if n > 1 else 0.0)


@dataclass(frozen=True)
class ArmStats:
    rewards: Moments
    relevance: Moments
    kl: Moments

    @classmethod
    def of(cls, samples: ArmSamples) -> ArmStats:
        return cls(
            Moments.of(samples.rewards), Moments.of(samples.relevance), Moments.of(samples.kl_to_reference)
        )


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    reason: str
    n_production: int
    n_canary: int
    mean_production: float
    mean_canary: float
    effect: float
    # Always-valid intervals; None until each arm has min_samples (or, for KL, when none was logged).
    effect_low: float | None = None
    effect_high: float | None = None
    relevance_production: float | None = None
    relevance_canary: float | None = None
    relevance_margin_low: float | None = None  # of rel_c − (1 − margin)·rel_p: > 0 shows non-inferiority
    relevance_margin_high: float | None = None
    mean_kl: float | None = None
    kl_low: float | None = None
    kl_high: float | None = None
    worse_by: str | None = None  # which test called a rollback: "reward", "relevance" or "kl"
    reward_tau: float | None = None  # the reward sequence's mixture spread, fixed at the first tested look

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def tested(self) -> bool:
        """Both arms had enough samples for the intervals (a healthy inconclusive look steps the share)."""
        return self.effect_low is not None


# ------------------------------------------------------------------------------------------ the arithmetic


def half_width(se: float, tau: float, alpha: float) -> float:
    """Half-width of the two-sided normal-mixture confidence sequence (see the module docstring)."""
    if se <= 0:
        return 0.0
    if tau <= 0:
        raise ValueError(f"the mixture's spread must be positive, not {tau}")
    r = (tau / se) ** 2
    return se * math.sqrt((1 + r) / r * (math.log1p(r) + 2 * math.log(1 / alpha)))


def confidence_sequence(estimate: float, se: float, tau: float, alpha: float) -> Interval:
    width = half_width(se, tau, alpha)
    return Interval(estimate - width, estimate + width)


def design_tau(mean_reward: float, policy: CanaryPolicy) -> float:
    """The reward sequence's mixture spread: ``design_lift`` of the mean reward per query (floored).

    Why it may come from the data: ``analyse`` takes ``mean_reward`` once, at the first tested look t0, from
    both arms pooled, and keeps the result (``reward_tau``). A spread fixed by t0's data makes the mixture
    a nonnegative martingale from t0 on, so by Ville's inequality P(any false verdict) ≤ α·E[M_t0(τ̂)]; and
    E[M_t0(τ̂)] = 1 when τ̂ is independent of the difference at t0, which the pooled mean is under identical
    arms (n_c·m_c + n_p·m_p is uncorrelated with m_c − m_p when the variances are equal; independent for
    normal data, asymptotically otherwise, like the plug-in variances). A spread re-estimated at every look
    would switch martingales between looks, which no inequality covers. tests/test_canary_analysis.py and
    benchmarks/bench_canary.py check the false-verdict rate on gain-like (mostly zero) rewards."""
    return max(policy.design_lift * mean_reward, MIN_TAU)


def _difference(canary: Moments, production: Moments, weight: float = 1.0) -> tuple[float, float]:
    """canary − weight·production and its standard error (unequal variances, Welch)."""
    estimate = canary.mean - weight * production.mean
    se = math.sqrt(canary.var / canary.n + weight**2 * production.var / production.n)
    return estimate, se


def queries_for_power(
    lift: float,
    mean: float,
    sd: float,
    policy: CanaryPolicy,
    power: float = 0.8,
    production_per_canary: float = 1.0,
    relevance: tuple[float, float] | None = None,
) -> int:
    """Canary-arm queries the rule needs to promote a candidate whose true mean reward is ``lift`` (0.10:
    +10%) above production's ``mean``, with probability ``power``, when the per-query reward has standard
    deviation ``sd`` and production has ``production_per_canary`` times as many queries (1.0: equal arms,
    the top share step 0.5; the smaller steps give production more, so this is the conservative count).
    The reward test is tuned to ``design_tau(mean)``, so the count depends on the reward's scale only
    through ``sd / mean``.

    ``relevance``: (mean, sd) of the per-query relevance, when the candidate's relevance equals
    production's; a promotion also needs the relevance guard's non-inferiority shown, which with a wide
    relevance spread can take longer than the reward (the two are treated as independent). The rule is
    taken to look once, at the end: looks in between only promote earlier, so this is an upper bound."""
    if lift <= 0 or mean <= 0 or sd <= 0:
        raise ValueError("lift, mean and sd must be positive")
    ratio = 1 / production_per_canary
    effect, tau = lift * mean, design_tau(mean, policy)

    def shown(margin: float, spread: float, n: float, tau: float, alpha: float, keep: float = 1.0) -> float:
        """P(the interval of an excess ``margin`` lies above 0 after n canary queries)."""
        se = spread * math.sqrt(1 / n + keep**2 * ratio / n)
        if se == 0:  # a constant metric: known exactly
            return 1.0 if margin > 0 else 0.0
        return float(norm.cdf((margin - half_width(se, max(tau, MIN_TAU), alpha)) / se))

    def promoted(n: float) -> float:
        p = shown(effect, sd, n, tau, policy.reward_alpha)
        if relevance is not None:
            relevance_mean, spread = relevance
            allowed = policy.relevance_margin * relevance_mean
            p *= shown(allowed, spread, n, allowed, policy.guard_alpha, 1 - policy.relevance_margin)
        return p

    def shortfall(n: float) -> float:
        return promoted(n)

    upper = 10.0
    while shortfall(upper) < power:
        upper *= 2
        if upper > 1e9:
            raise ValueError("the effect is too small to detect")
    return math.ceil(brentq(lambda n: shortfall(n) - power, 2.0, upper))


# ------------------------------------------------------------------------------------------- the decision


def analyse(
    production: ArmSamples,
    canary: ArmSamples,
    policy: CanaryPolicy,
    analyses_so_far: int = 0,
    reward_tau: float | None = None,
) -> Analysis:
    """The verdict on the two arms' samples since the candidate went live.

    ``reward_tau``: the reward sequence's spread, as the candidate's first tested analysis fixed it (its
    ``Analysis.reward_tau``; every later analysis returns it unchanged); None until then, and this analysis,
    if tested, fixes it from the mean reward now (``design_tau``). Pass back what the last analysis returned.
    """
    return analyse_stats(ArmStats.of(production), ArmStats.of(canary), policy, analyses_so_far, reward_tau)


def analyse_stats(
    production: ArmStats,
    canary: ArmStats,
    policy: CanaryPolicy,
    analyses_so_far: int = 0,
    reward_tau: float | None = None,
) -> Analysis:
    """``analyse`` on the arms' moments (the benchmark runs thousands of canaries through this)."""
    n_p, n_c = production.rewards.n, canary.rewards.n
    base = Analysis(
        verdict="continue",
        reason="",
        n_production=n_p,
        n_canary=n_c,
        mean_production=production.rewards.mean,
        mean_canary=canary.rewards.mean,
        effect=canary.rewards.mean - production.rewards.mean if n_p and n_c else float("nan"),
        reward_tau=reward_tau,
    )
    if n_p < policy.min_samples or n_c < policy.min_samples:
        return _out_of_budget(
            replace(base, reason=f"need {policy.min_samples} queries per arm"), policy, analyses_so_far
        )
    if reward_tau is None:
        base = replace(base, reward_tau=design_tau(_pooled_mean(production.rewards, canary.rewards), policy))
    tested = _intervals(base, production, canary, policy)
    verdict = _verdict(tested, policy)
    return verdict if verdict.verdict != "continue" else _out_of_budget(verdict, policy, analyses_so_far)


def _pooled_mean(a: Moments, b: Moments) -> float:
    return (a.n * a.mean + b.n * b.mean) / (a.n + b.n)


def _intervals(base: Analysis, production: ArmStats, canary: ArmStats, policy: CanaryPolicy) -> Analysis:
    assert base.reward_tau is not None
    effect, se = _difference(canary.rewards, production.rewards)
    reward = confidence_sequence(effect, se, base.reward_tau, policy.reward_alpha)
    keep = 1 - policy.relevance_margin
    rel_diff, rel_se = _difference(canary.relevance, production.relevance, keep)
    # Tuned to the margin itself: the guard is there to tell "within the margin" from "beyond it". (A
    # production that retrieves nothing relevant allows no deficit; the mixture still needs a spread.)
    allowed = max(policy.relevance_margin * production.relevance.mean, MIN_TAU)
    rel = confidence_sequence(rel_diff, rel_se, allowed, policy.guard_alpha)
    analysis = replace(
        base,
        effect_low=reward.low,
        effect_high=reward.high,
        relevance_production=production.relevance.mean,
        relevance_canary=canary.relevance.mean,
        relevance_margin_low=rel.low,
        relevance_margin_high=rel.high,
    )
    if canary.kl.n >= policy.min_samples:
        kl = confidence_sequence(
            canary.kl.mean, math.sqrt(canary.kl.var / canary.kl.n), policy.max_kl, policy.guard_alpha
        )
        analysis = replace(analysis, mean_kl=canary.kl.mean, kl_low=kl.low, kl_high=kl.high)
    return analysis


def _verdict(a: Analysis, policy: CanaryPolicy) -> Analysis:
    assert a.effect_low is not None and a.effect_high is not None
    assert a.relevance_margin_low is not None and a.relevance_margin_high is not None
    # Four decimals and the relative figure: a gain-like reward's effects are thousandths.
    relative = f", {a.effect / a.mean_production:+.0%}" if a.mean_production > 0 else ""
    effect = f"{a.effect:+.4f}{relative}"
    interval = f"[{a.effect_low:+.4f}, {a.effect_high:+.4f}]"
    if a.relevance_margin_high < 0:
        return replace(
            a,
            verdict="rollback",
            worse_by="relevance",
            reason=f"relevance guard: canary {a.relevance_canary:.3f} vs production "
            f"{a.relevance_production:.3f}, worse than the {policy.relevance_margin:.0%} margin allows "
            f"(interval of the excess [{a.relevance_margin_low:+.3f}, {a.relevance_margin_high:+.3f}])",
        )
    if a.kl_low is not None and a.kl_low > policy.max_kl:
        return replace(
            a,
            verdict="rollback",
            worse_by="kl",
            reason=f"KL guard: {a.mean_kl:.2f} nats from production, interval [{a.kl_low:.2f}, "
            f"{a.kl_high:.2f}] above the bound {policy.max_kl}",
        )
    if a.effect_high < 0:
        return replace(
            a, verdict="rollback", worse_by="reward", reason=f"worse by {effect} (interval {interval})"
        )
    guards_shown = a.relevance_margin_low > 0 and (a.kl_high is None or a.kl_high < policy.max_kl)
    if a.effect_low > 0 and guards_shown:
        return replace(a, verdict="promote", reason=f"better by {effect} (interval {interval})")
    if a.effect_low > 0:
        return replace(a, reason=f"better by {effect} {interval}; guards not yet shown")
    return replace(a, reason=f"not yet conclusive ({effect}, interval {interval})")


def _out_of_budget(a: Analysis, policy: CanaryPolicy, analyses_so_far: int) -> Analysis:
    """After ``max_queries`` canary queries or ``max_analyses`` analyses: inconclusive, production stays."""
    if a.n_canary >= policy.max_queries:
        return replace(
            a, verdict="inconclusive", reason=f"no verdict after {a.n_canary} canary queries ({a.reason})"
        )
    if analyses_so_far + 1 >= policy.max_analyses:
        return replace(
            a,
            verdict="inconclusive",
            reason=f"no verdict after {policy.max_analyses} analyses ({a.reason})",
        )
    return a


def next_share(current: float, steps: Sequence[float]) -> float:
    """The next traffic share for the canary (Argo Rollouts / Flagger style steps, e.g. 0.1 → 0.25 → 0.5)."""
    later = [s for s in steps if s > current]
    return later[0] if later else current
