"""Off-policy evaluation: what a candidate policy would have earned on logged traffic, without serving it.

Each logged rewrite was sampled by the serving (behaviour) policy b with log-probability ``logp_b`` (recorded
in the QueryEvent) and earned a reward r. For a candidate π we compute ``logp_π`` of the same text and weight
the reward by the importance ratio w = π(y|x) / b(y|x):

- IPS:    V̂ = mean(w · r)                      unbiased, high variance;
- SNIPS:  V̂ = Σ w · r / Σ w                    self-normalised: slightly biased, far lower variance.

Confidence intervals are normal approximations (IPS: the sample standard error of w·r; SNIPS: the delta
method). The effective sample size ESS = (Σ w)² / Σ w² says how many logged samples the estimate is really
worth; when it is a small fraction of n, or one sample carries most of the weight, the weights are too
heavy-tailed to trust and the report says so. Sequence-level ratios of rewrites of 5-15 tokens easily span
orders of magnitude, so ratios are computed in log space and clipped at ``max_log_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class OPEEstimate:
    n: int
    ips: float
    ips_ci: tuple[float, float]
    snips: float
    snips_ci: tuple[float, float]
    ess: float
    max_weight_share: float
    warning: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "ips": self.ips,
            "ips_ci": list(self.ips_ci),
            "snips": self.snips,
            "snips_ci": list(self.snips_ci),
            "ess": self.ess,
            "max_weight_share": self.max_weight_share,
            "warning": self.warning,
        }


def importance_weights(
    logp_candidate: Sequence[float], logp_behaviour: Sequence[float], max_log_ratio: float = 20.0
) -> np.ndarray:
    log_ratio = np.asarray(logp_candidate, dtype=np.float64) - np.asarray(logp_behaviour, dtype=np.float64)
    return np.exp(np.clip(log_ratio, -max_log_ratio, max_log_ratio))


def estimate(
    rewards: Sequence[float],
    logp_candidate: Sequence[float],
    logp_behaviour: Sequence[float],
    *,
    min_ess_fraction: float = 0.05,
    max_single_share: float = 0.5,
    max_log_ratio: float = 20.0,
) -> OPEEstimate:
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        raise ValueError("off-policy evaluation needs at least one logged sample")
    if not (len(logp_candidate) == len(logp_behaviour) == r.size):
        raise ValueError("rewards and both log-probability lists must have the same length")
    w = importance_weights(logp_candidate, logp_behaviour, max_log_ratio)
    n = r.size
    wr = w * r
    ips = float(wr.mean())
    ips_se = float(wr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    total = float(w.sum())
    snips = float(wr.sum() / total)
    # Delta method for a ratio estimator: Var ≈ Σ w²(r − V̂)² / (Σ w)².
    snips_se = float(math.sqrt(float(np.sum(w**2 * (r - snips) ** 2))) / total) if n > 1 else float("inf")
    ess = total**2 / float(np.sum(w**2))
    share = float(w.max() / total)
    warning = None
    if ess < min_ess_fraction * n or share > max_single_share:
        warning = (
            f"importance weights are heavy-tailed (ESS {ess:.1f} of {n}, largest weight {share:.0%} of the "
            "total): the candidate is too far from the logging policy for this log; do not trust the estimate"
        )
    return OPEEstimate(
        n=n,
        ips=ips,
        ips_ci=(ips - Z_95 * ips_se, ips + Z_95 * ips_se),
        snips=snips,
        snips_ci=(snips - Z_95 * snips_se, snips + Z_95 * snips_se),
        ess=ess,
        max_weight_share=share,
        warning=warning,
    )
