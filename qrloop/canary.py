"""Canary analysis, Kayenta-style: is the canary arm better, worse, or not yet known?

The decision is a pure function of the two arms' per-query samples so it is tested without a scheduler:

1. **Enough data?** Each arm needs ``min_samples`` queries in the window, else *keep collecting*.
2. **Guards first** (they veto a promotion whatever the reward says):
   - relevance floor: the canary's mean relevance must not fall below ``relevance_floor`` × production's.
     A policy can raise clicks while drifting off the shopper's intent (reward hacking); relevance is what
     keeps it honest.
   - KL to the reference: the mean per-query log-ratio of the canary's rewrites, log π_canary − log π_ref,
     must stay under ``max_kl``; a policy that ran far from its reference is untrustworthy.
   A guard failure is a *roll back*.
3. **Reward**: a two-sided Mann-Whitney U test (scipy) on the per-query rewards plus a minimum effect on
   the mean difference. Significantly better by at least ``min_effect`` → *promote*; significantly worse by
   at least ``min_effect`` → *roll back*; otherwise *keep collecting* (or, after ``max_windows`` windows
   without a decision, roll back conservatively).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from scipy.stats import mannwhitneyu

Verdict = Literal["promote", "continue", "rollback"]


@dataclass(frozen=True)
class CanaryPolicy:
    min_samples: int = 30
    alpha: float = 0.05
    min_effect: float = 0.02
    relevance_floor: float = 0.95
    max_kl: float = 5.0
    max_windows: int = 10


@dataclass(frozen=True)
class ArmSamples:
    rewards: Sequence[float]
    relevance: Sequence[float]
    kl_to_reference: Sequence[float] = ()


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    reason: str
    n_production: int
    n_canary: int
    mean_production: float
    mean_canary: float
    effect: float
    p_value: float | None
    relevance_ratio: float | None
    mean_kl: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def analyse(
    production: ArmSamples, canary: ArmSamples, policy: CanaryPolicy, windows_so_far: int = 0
) -> Analysis:
    n_p, n_c = len(production.rewards), len(canary.rewards)
    mean_p, mean_c = _mean(production.rewards), _mean(canary.rewards)
    # Every verdict carries the sample sizes and means; each branch below fills in what it measured.
    base = Analysis(
        verdict="continue",
        reason="",
        n_production=n_p,
        n_canary=n_c,
        mean_production=mean_p,
        mean_canary=mean_c,
        effect=mean_c - mean_p if n_p and n_c else float("nan"),
        p_value=None,
        relevance_ratio=None,
        mean_kl=None,
    )
    if n_p < policy.min_samples or n_c < policy.min_samples:
        return replace(base, reason=f"need {policy.min_samples} queries per arm")

    rel_p, rel_c = _mean(production.relevance), _mean(canary.relevance)
    relevance_ratio = rel_c / rel_p if rel_p > 0 else float("inf")
    mean_kl = _mean(canary.kl_to_reference) if len(canary.kl_to_reference) else None
    guarded = replace(base, relevance_ratio=relevance_ratio, mean_kl=mean_kl)
    if relevance_ratio < policy.relevance_floor:
        return replace(
            guarded,
            verdict="rollback",
            reason=f"relevance guard: canary at {relevance_ratio:.0%} of production "
            f"(floor {policy.relevance_floor:.0%})",
        )
    if mean_kl is not None and mean_kl > policy.max_kl:
        return replace(
            guarded,
            verdict="rollback",
            reason=f"KL guard: {mean_kl:.2f} nats from the reference (max {policy.max_kl})",
        )

    p_value = float(mannwhitneyu(canary.rewards, production.rewards, alternative="two-sided").pvalue)
    effect = mean_c - mean_p
    tested = replace(guarded, p_value=p_value)
    if p_value < policy.alpha and effect >= policy.min_effect:
        return replace(tested, verdict="promote", reason=f"better by {effect:+.3f} (p={p_value:.3g})")
    if p_value < policy.alpha and effect <= -policy.min_effect:
        return replace(tested, verdict="rollback", reason=f"worse by {effect:+.3f} (p={p_value:.3g})")
    if windows_so_far + 1 >= policy.max_windows:
        return replace(
            tested,
            verdict="rollback",
            reason=f"no significant improvement after {policy.max_windows} windows",
        )
    return replace(tested, reason=f"not yet significant ({effect:+.3f}, p={p_value:.3g})")


def next_share(current: float, steps: Sequence[float]) -> float:
    """The next traffic share for the canary (Argo Rollouts / Flagger style steps, e.g. 0.1 → 0.25 → 0.5)."""
    later = [s for s in steps if s > current]
    return later[0] if later else current
