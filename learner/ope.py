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

:func:`evaluate_rewrites` applies this to logged query events and the rewards their rewrites earned (the
root's ``qrloop evaluate`` attributes a log with ``streams.replay.attribute`` first); :func:`model_scorer`
gives ``logp_π`` for a policy directory the way the learner's DPO step scores a completion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from learner.dpo import sequence_logprobs, tokenize_pairs
from qrloop.events import QueryEvent
from qrloop.prompting import build_prompt, end_of_turn, user_message

Z_95 = 1.959963984540054

# One value per logged sample: a list, or a 1-D numpy array (read with np.asarray and len() alike).
PerSample = Sequence[float] | np.ndarray


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
    logp_candidate: PerSample, logp_behaviour: PerSample, max_log_ratio: float = 20.0
) -> np.ndarray:
    log_ratio = np.asarray(logp_candidate, dtype=np.float64) - np.asarray(logp_behaviour, dtype=np.float64)
    return np.exp(np.clip(log_ratio, -max_log_ratio, max_log_ratio))


def estimate(
    rewards: PerSample,
    logp_candidate: PerSample,
    logp_behaviour: PerSample,
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


# -- a candidate on logged rewrites -------------------------------------------------------------------------

# (queries, rewrite texts) -> one (log π(first), log π(second)) per query under the candidate.
CandidateScorer = Callable[[Sequence[QueryEvent]], list[tuple[float, float]]]


@dataclass(frozen=True)
class Samples:
    """One row per logged rewrite: its reward, and its log-probability under behaviour and candidate."""

    rewards: list[float]
    logp_behaviour: list[float]
    logp_candidate: list[float]
    versions: dict[str, int]  # the serving versions in the log (str(None) for the base model) -> queries


def ope_samples(
    events: Sequence[QueryEvent], rewards: Sequence[tuple[float, float]], scorer: CandidateScorer
) -> Samples:
    """``rewards``: the (first, second) rewrite's reward of each event, in the same order."""
    candidate = scorer(events)
    flat_rewards, behaviour, target = [], [], []
    versions: dict[str, int] = {}
    for event, earned, logps in zip(events, rewards, candidate, strict=True):
        flat_rewards += list(earned)
        behaviour += [event.rewrites[0].logprob, event.rewrites[1].logprob]
        target += list(logps)
        versions[str(event.policy_version)] = versions.get(str(event.policy_version), 0) + 1
    return Samples(flat_rewards, behaviour, target, versions)


@dataclass(frozen=True)
class Evaluation:
    candidate: str
    queries: int
    logged_mean_reward: float
    estimate: OPEEstimate
    serving_versions: dict[str, int]
    mean_log_ratio: float
    # Mean importance weight: 1 in expectation when the log covers the candidate; far from 1, the candidate
    # puts its mass where the serving policy rarely sampled and IPS (not SNIPS) is off the reward's scale.
    mean_weight: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "queries": self.queries,
            "samples": self.estimate.n,
            "logged_mean_reward": self.logged_mean_reward,
            "serving_versions": self.serving_versions,
            "mean_log_ratio": self.mean_log_ratio,
            "mean_weight": self.mean_weight,
            **self.estimate.as_dict(),
        }


def evaluate_rewrites(
    events: Sequence[QueryEvent],
    rewards: Sequence[tuple[float, float]],
    scorer: CandidateScorer,
    candidate: str = "candidate",
) -> Evaluation:
    """IPS/SNIPS of ``scorer``'s policy on logged query events whose rewrites earned ``rewards``."""
    samples = ope_samples(events, rewards, scorer)
    result = estimate(samples.rewards, samples.logp_candidate, samples.logp_behaviour)
    ratios = [c - b for c, b in zip(samples.logp_candidate, samples.logp_behaviour, strict=True)]
    return Evaluation(
        candidate=candidate,
        queries=len(events),
        logged_mean_reward=sum(samples.rewards) / len(samples.rewards),
        estimate=result,
        serving_versions=samples.versions,
        mean_log_ratio=sum(ratios) / len(ratios),
        mean_weight=float(importance_weights(samples.logp_candidate, samples.logp_behaviour).mean()),
    )


def model_scorer(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int = 16) -> CandidateScorer:
    """Teacher-forced sequence log-probabilities of the logged rewrite texts under ``model``.

    The same prompt (``qrloop.prompting``), the same terminator (the token generation stops on) and the same
    tokenisation as the learner's DPO step, summed over the rewrite's tokens at temperature 1: the quantity
    the rewriter logs for the tokens it sampled. A rewrite of ``max_new_tokens`` tokens or more was cut off
    by the length limit, not ended by the policy; its logged log-prob has no terminator term, so neither
    does its score here (with the terminator, SmolLM2's scores of cut-off rewrites were 15-30 nats lower).
    """
    eos = end_of_turn(tokenizer, getattr(model, "generation_config", None))

    def cut_off(message: str, text: str) -> bool:
        prompt = build_prompt(tokenizer, message)
        added = len(tokenizer(prompt + text)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
        return added >= max_new_tokens

    def score_rows(rows: list[tuple[str, str]], terminator: str) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(rows), batch_size):
            # Each rewrite in the "chosen" half; the "rejected" half is an empty completion (nearly free).
            triples = [(query, text, "") for query, text in rows[i : i + batch_size]]
            with torch.no_grad():
                chosen, _ = sequence_logprobs(model, tokenize_pairs(tokenizer, triples, None, terminator))
            scores += [float(x) for x in chosen]
        return scores

    def score(events: Sequence[QueryEvent]) -> list[tuple[float, float]]:
        # Under the prompt each rewrite was sampled from: a hinted policy's shows the event's hints too.
        rows = [(user_message(e.query, e.hints), r.text) for e in events for r in e.rewrites]
        ended = [i for i, (q, t) in enumerate(rows) if not cut_off(q, t)]
        cut = [i for i in range(len(rows)) if i not in set(ended)]
        flat = [0.0] * len(rows)
        for indices, terminator in ((ended, eos), (cut, "")):
            for i, value in zip(indices, score_rows([rows[i] for i in indices], terminator), strict=True):
                flat[i] = value
        return [(flat[2 * k], flat[2 * k + 1]) for k in range(len(events))]

    return score
