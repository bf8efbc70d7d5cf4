"""The canary's decision rules on resampled outcomes: false verdicts (A/A) and power (A/B), side by side.

    .venv/bin/python benchmarks/bench_canary.py                          # the gain generator (see below)
    .venv/bin/python benchmarks/bench_canary.py --topic qrloop.query-outcomes.<run id>   # a real run's topic
    .venv/bin/python benchmarks/bench_canary.py --jsonl outcomes.jsonl   # an exported log of QueryOutcomes

**The pool.** Per-query outcomes (mean reward and mean relevance of the two rewrites, and the canary's
log-ratio to production where logged) of a real run: every ``QueryOutcome`` of ``--topic`` (read to its end
with ``streams.replay.read_topics``) or of ``--jsonl`` (one encoded outcome a line). Without either, a
generator stands in, ``--generator``:

- ``gain`` (default; the reward DPO and the canary use, ``rewards.ranking = "gain"``): zero-inflated, with
  the moments of the 320-query demo run 20261201-145101's outcomes: 44% of queries earn exactly 0, the rest
  a Gamma (shape 0.74, scale 0.029), so mean 0.012 and sd 0.021; relevance a Beta with that run's mean
  0.31 and sd 0.15, independent of the reward (``gain_pool``);
- ``scalar``: the paper's weighted mean, from the README's figures of an earlier demo run: mean relevance
  0.63, mean reward per query about 0.20; every rewrite's reward is the real ``qrloop.rewards``
  combination of simulated signals (per-query difficulty, 10 products, click / add-to-cart / purchase
  funnels, 5% of rewrites retrieving nothing) (``generated_pool``).

**A canary.** Both arms draw outcomes with replacement from the pool. A/A: nothing else. A/B at effect e:
every canary outcome's reward is raised by e × the pool's mean reward (relevance unchanged), so "+10%" is a
candidate whose mean reward is 10% higher.

- ``rel``, the sequential rule as the job runs it (``qrloop.canary.analyse_stats``, default
  ``CanarySettings``): every look, ``--queries-per-look`` queries arrive (the demo serves about 30 a minute,
  one look per ``interval_s`` = 60 s); each goes to the canary with the current share, which steps along
  ``share_steps`` after every healthy inconclusive look, as the job does; evidence accumulates since the
  candidate went live; the reward test's spread is ``design_lift`` of the mean reward, fixed at the first
  tested look and passed back, as the job does; stop at the first verdict or ``max_queries`` /
  ``max_analyses`` (inconclusive).
- ``abs``, the same rule with the reward test's spread fixed at ``--abs-tau`` (0.02, the absolute
  ``design_effect`` it had before ``design_lift``: +10% of the scalar's mean).
- ``mw``, the per-window Mann–Whitney rule the sequential one replaced, as issue #13 measured it:
  production 270 outcomes, canary 30 + 10 per window, up to 10 analyses; guards as point ratios; ten
  inconclusive windows end in a roll back (its thresholds are absolute, 0.02, tuned to the scalar).

Printed per rule and effect: promote, roll back as worse (and by which test), inconclusive, and the median
canary and total queries a verdict took; then the queries per arm ``queries_for_power`` predicts for 80%
power at each effect, with the pool's mean and standard deviation, for ``rel`` and ``abs``.
``--max-queries`` (and ``--max-analyses``) lengthen the canary to see how many queries a verdict takes
when the default length is too short.

``--delivery``: instead, ten operator moves of ``production`` (``set_alias`` / ``rollback``, which write only
the database; no announcement) against a rewriter whose ``AnnouncementFollower`` runs with the default
``rewriter.reconcile_s``, on a fresh SQLite store, the broker and two tiny policies: the seconds until each
move is served, median and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from qrloop.canary import (
    ArmStats,
    CanaryPolicy,
    Moments,
    analyse_stats,
    design_tau,
    next_share,
    queries_for_power,
)
from qrloop.canary_job import policy_of
from qrloop.events import QueryOutcome, SchemaError, decode
from qrloop.rewards import RewardComponents
from qrloop.runs import open_store
from qrloop.settings import RewardSettings, Settings

EFFECTS = (0.0, 0.05, 0.10, 0.15, 0.20, -0.10)
RULES = ("mw", "abs", "rel")


@dataclass(frozen=True)
class Pool:
    rewards: np.ndarray
    relevance: np.ndarray
    kl: np.ndarray | None  # the canary's log-ratios to production, when the source logged them
    source: str


# ------------------------------------------------------------------------------------------------ the pool


def generated_pool(n: int, rng: np.random.Generator) -> Pool:
    """Per-query outcomes from the README's figures (module docstring), rewards by ``qrloop.rewards``."""
    weights = RewardSettings()
    # Query difficulty: a Beta with mean 0.665 and sd 0.15 (concentration 8.8), per query; with 5% of
    # rewrites retrieving nothing the outcomes' mean relevance is the README's 0.63.
    difficulty = rng.beta(0.665 * 8.8, 0.335 * 8.8, n)
    rewards, relevance = np.empty(n), np.empty(n)
    for i in range(n):
        per_rewrite = []
        for _ in range(2):
            if rng.random() < 0.05:  # a rewrite that retrieves nothing earns nothing
                per_rewrite.append(RewardComponents(0.0, 0.0, 0.0, 0.0, 0.0))
                continue
            rel = float(np.clip(difficulty[i] + rng.normal(0, 0.08), 0, 1))
            clicks = rng.binomial(10, 0.16 * rel)
            carts = rng.binomial(clicks, 0.35)
            bought = rng.binomial(carts, 0.6)
            per_rewrite.append(
                RewardComponents(rel, float(rng.beta(2, 3)), clicks / 10, carts / 10, bought / 10)
            )
        rewards[i] = np.mean([c.combined(weights) for c in per_rewrite])
        relevance[i] = np.mean([c.relevance for c in per_rewrite])
    # A DPO step's log-ratio to its parent: small on average, wide per sequence.
    kl = rng.normal(0.3, 1.0, n)
    return Pool(rewards, relevance, kl, f"generator ({n} queries, README figures)")


def gain_pool(n: int, rng: np.random.Generator) -> Pool:
    """Gain-like outcomes with the demo run's moments (module docstring): mostly zeros, a long right tail."""
    earned = rng.random(n) >= 0.44
    rewards = np.where(earned, rng.gamma(0.74, 0.029, n), 0.0)
    relevance = rng.beta(0.31 * 8.5, 0.69 * 8.5, n)  # concentration 8.5: sd 0.15 at mean 0.31
    kl = rng.normal(0.3, 1.0, n)  # as generated_pool: a DPO step's log-ratio to its parent
    return Pool(rewards, relevance, kl, f"gain generator ({n} queries, demo run moments)")


def outcomes_pool(outcomes: Sequence[QueryOutcome], source: str) -> Pool:
    if len(outcomes) < 50:
        raise SystemExit(f"{source}: only {len(outcomes)} outcomes; a pool needs at least 50")
    kl = [o.kl_to_reference for o in outcomes if o.kl_to_reference is not None]
    return Pool(
        np.array([o.reward for o in outcomes]),
        np.array([o.relevance for o in outcomes]),
        np.array(kl) if len(kl) >= 50 else None,
        f"{source} ({len(outcomes)} outcomes)",
    )


def topic_pool(bootstrap: str, topic: str) -> Pool:
    from streams.replay import read_topics

    outcomes = []
    for record in read_topics(bootstrap, [topic]):
        try:
            outcomes.append(decode(QueryOutcome, record.value))
        except (SchemaError, ValueError, RecursionError):  # not an outcome: no sample
            continue
    return outcomes_pool(outcomes, f"topic {topic}")


def jsonl_pool(path: Path) -> Pool:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return outcomes_pool([decode(QueryOutcome, line.encode()) for line in lines], str(path))


# ---------------------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class Result:
    verdict: str  # promote / rollback / inconclusive
    worse_by: str | None
    canary_queries: int
    total_queries: int


class Running:
    """Count, sum and sum of squares of one metric: the moments after every look in O(1)."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        self.n += len(values)
        self.s += float(values.sum())
        self.ss += float((values**2).sum())

    def moments(self) -> Moments:
        if self.n == 0:
            return Moments(0, float("nan"), float("nan"))
        mean = self.s / self.n
        var = max(self.ss - self.n * mean**2, 0.0) / (self.n - 1) if self.n > 1 else 0.0
        return Moments(self.n, mean, var)


def sequential_rule(
    pool: Pool,
    effect: float,
    rng: np.random.Generator,
    policy: CanaryPolicy,
    steps: Sequence[float],
    per_look: int,
    fixed_tau: float | None = None,
) -> Result:
    """The job's rule; ``fixed_tau``: the reward test's spread from the start (the absolute tuning), else
    fixed by the first tested look as the job fixes it."""
    shift = effect * float(pool.rewards.mean())
    tau = fixed_tau
    arms = {arm: (Running(), Running(), Running()) for arm in ("production", "canary")}
    share, analyses, total = steps[0], 0, 0
    while True:
        picks = rng.integers(0, len(pool.rewards), per_look)
        to_canary = rng.random(per_look) < share
        total += per_look
        for arm, chosen in (("production", picks[~to_canary]), ("canary", picks[to_canary])):
            reward, relevance, kl = arms[arm]
            reward.add(pool.rewards[chosen] + (shift if arm == "canary" else 0.0))
            relevance.add(pool.relevance[chosen])
            if arm == "canary" and pool.kl is not None:
                kl.add(pool.kl[chosen])
        production, canary = (ArmStats(*(m.moments() for m in arms[arm])) for arm in ("production", "canary"))
        analysis = analyse_stats(production, canary, policy, analyses, tau)
        if analysis.verdict != "continue":
            return Result(analysis.verdict, analysis.worse_by, canary.rewards.n, total)
        tau = analysis.reward_tau
        if analysis.tested:
            analyses += 1
            share = next_share(share, steps)


def old_rule(pool: Pool, effect: float, rng: np.random.Generator) -> Result:
    """Issue #13's measurement of the replaced rule: production 270, canary 30 + 10 per window, 10 windows."""
    shift = effect * float(pool.rewards.mean())
    production = rng.integers(0, len(pool.rewards), 270)
    rew_p, rel_p = pool.rewards[production], pool.relevance[production]
    canary = rng.integers(0, len(pool.rewards), 30 + 10 * 9)
    for window in range(10):
        chosen = canary[: 30 + 10 * window]
        rew_c, rel_c = pool.rewards[chosen] + shift, pool.relevance[chosen]
        n_c, total = len(chosen), 270 + len(chosen)
        if rel_c.mean() / rel_p.mean() < 0.95:
            return Result("rollback", "relevance", n_c, total)
        if pool.kl is not None and pool.kl[chosen].mean() > 5.0:
            return Result("rollback", "kl", n_c, total)
        p = float(mannwhitneyu(rew_c, rew_p, alternative="two-sided").pvalue)
        diff = float(rew_c.mean() - rew_p.mean())
        if p < 0.05 and diff >= 0.02:
            return Result("promote", None, n_c, total)
        if p < 0.05 and diff <= -0.02:
            return Result("rollback", "reward", n_c, total)
    return Result("rollback", "no improvement", n_c, total)


# ---------------------------------------------------------------------------------------------- reporting


def summarise(rule: str, effect: float, results: list[Result]) -> str:
    n = len(results)
    verdicts = Counter(r.verdict for r in results)
    worse = Counter(r.worse_by for r in results if r.verdict == "rollback")
    decided = [r for r in results if r.verdict in ("promote", "rollback")] or results
    by = ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(worse.items(), key=str))
    return (
        f"{rule:<4} {effect:+5.0%} | promote {verdicts['promote'] / n:6.1%} | "
        f"roll back {verdicts['rollback'] / n:6.1%} ({by or '-'}) | inconclusive "
        f"{verdicts['inconclusive'] / n:6.1%} | median canary/total queries to a verdict "
        f"{statistics.median(r.canary_queries for r in decided):.0f}/"
        f"{statistics.median(r.total_queries for r in decided):.0f}"
    )


def delivery(bootstrap: str, moves: int = 10) -> None:
    """Seconds from an operator's unannounced alias move to the rewriter serving it (module docstring)."""
    import tempfile
    import uuid

    from policy_store.db import upgrade
    from qrloop.models import build_tiny_policy, require_policy
    from qrloop.serving import AnnouncementFollower, Rewriter, load_version
    from qrloop.topics import ensure_topics

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = Settings()
        topics = base.topics.model_copy(update={"policy_versions": f"bench-canary-{uuid.uuid4().hex[:8]}.v"})
        settings = base.model_copy(
            update={
                "database_url": f"sqlite:///{root / 'store.db'}",
                "blob_dir": root / "blobs",
                "topics": topics,
            }
        )
        ensure_topics(settings, {topics.policy_versions: 1})
        upgrade(settings.db_url)
        tokenizer = require_policy(base)
        with open_store(settings) as store:
            v1, v2 = (
                store.publish(build_tiny_policy(root / f"p{i}", tokenizer, seed=i), base_model="tiny").id
                for i in range(2)
            )
            store.set_alias("production", v1)
            rewriter = Rewriter(load_version(store.load_dir(v1), v1), lambda _t: [], settings.rewriter)
            follower = AnnouncementFollower(settings, rewriter, "production", store).start()
            delays = []
            try:
                for i in range(moves):
                    target = v2 if i % 2 == 0 else v1
                    started = time.monotonic()
                    if target == v2:
                        store.set_alias("production", v2, actor="operator")
                    else:
                        store.rollback("production", actor="operator")
                    while rewriter.version != target:
                        time.sleep(0.02)
                    delays.append(time.monotonic() - started)
            finally:
                follower.stop()
    every = settings.rewriter.reconcile_s
    print(f"{moves} unannounced operator moves, reconcile every {every} s: served after median "
          f"{statistics.median(delays):.2f} s, max {max(delays):.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topic", help="A run's query-outcomes topic on the broker.")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--jsonl", type=Path, help="A file of encoded QueryOutcomes, one a line.")
    parser.add_argument("--generator", choices=("gain", "scalar"), default="gain", help="No --topic/--jsonl.")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--queries-per-look", type=int, default=30)
    parser.add_argument("--pool-size", type=int, default=5000, help="Generated queries (no --topic/--jsonl).")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--effects", type=float, nargs="*", default=list(EFFECTS))
    parser.add_argument("--rules", nargs="*", choices=RULES, default=list(RULES))
    parser.add_argument("--abs-tau", type=float, default=0.02, help="The abs rule's fixed spread.")
    parser.add_argument("--max-queries", type=int, help="Override canary.max_queries (a longer canary).")
    parser.add_argument("--max-analyses", type=int, help="Override canary.max_analyses.")
    parser.add_argument("--delivery", action="store_true", help="Measure alias-move delivery instead.")
    args = parser.parse_args()
    if args.delivery:
        delivery(args.bootstrap)
        return

    rng = np.random.default_rng(args.seed)
    if args.topic:
        pool = topic_pool(args.bootstrap, args.topic)
    elif args.jsonl:
        pool = jsonl_pool(args.jsonl)
    elif args.generator == "gain":
        pool = gain_pool(args.pool_size, rng)
    else:
        pool = generated_pool(args.pool_size, rng)
    config = Settings().canary
    policy = policy_of(config)
    budget = {"max_queries": args.max_queries, "max_analyses": args.max_analyses}
    policy = replace(policy, **{k: v for k, v in budget.items() if v is not None})
    mean, sd = float(pool.rewards.mean()), float(pool.rewards.std(ddof=1))
    print(f"pool: {pool.source}; reward mean {mean:.4f} sd {sd:.4f} zeros {np.mean(pool.rewards == 0):.0%}; "
          f"relevance mean {pool.relevance.mean():.4f} sd {pool.relevance.std(ddof=1):.4f}")  # fmt: skip
    print(f"policy: {policy}; shares {config.share_steps}; {args.queries_per_look} queries per look")
    tau = design_tau(mean, policy)
    print(f"rel: tau = {policy.design_lift:.0%} of the mean at the first tested look (~{tau:.4f} here); "
          f"abs: tau = {args.abs_tau}; {args.trials} trials per row, the same draws per rule\n")  # fmt: skip
    for index, effect in enumerate(args.effects):
        for rule in args.rules:
            started = time.perf_counter()
            draws = np.random.default_rng([args.seed, index])  # common random numbers across the rules
            results = [
                run_rule(rule, pool, effect, draws, policy, config.share_steps, args)
                for _ in range(args.trials)
            ]
            print(summarise(rule, effect, results) + f"   ({time.perf_counter() - started:.0f} s)")
    relevance = (float(pool.relevance.mean()), float(pool.relevance.std(ddof=1)))
    # The abs rule is design_tau = abs_tau at this pool's mean, i.e. a lift of abs_tau / mean.
    absolute = replace(policy, design_lift=args.abs_tau / mean)
    print("\ncanary queries for 80% power (queries_for_power; reward test alone | with the relevance guard; "
          "equal arms, and production 3x canary), rel vs abs:")  # fmt: skip
    for effect in (0.05, 0.10, 0.15, 0.20, 0.25):
        line = []
        for name, tuned in (("rel", policy), ("abs", absolute)):
            counts = [
                queries_for_power(effect, mean, sd, tuned, production_per_canary=ratio, relevance=rel)
                for ratio in (1.0, 3.0)
                for rel in (None, relevance)
            ]
            line.append(
                f"{name}: equal arms {counts[0]} | {counts[1]}, production 3x {counts[2]} | {counts[3]}"
            )
        print(f"  +{effect:.0%} (+{effect * mean:.4f}): " + ";  ".join(line))
    print(json.dumps({"max_queries": policy.max_queries, "max_analyses": policy.max_analyses}))


def run_rule(
    rule: str,
    pool: Pool,
    effect: float,
    rng: np.random.Generator,
    policy: CanaryPolicy,
    steps: Sequence[float],
    args: argparse.Namespace,
) -> Result:
    if rule == "mw":
        return old_rule(pool, effect, rng)
    fixed = args.abs_tau if rule == "abs" else None
    return sequential_rule(pool, effect, rng, policy, steps, args.queries_per_look, fixed)


if __name__ == "__main__":
    main()
