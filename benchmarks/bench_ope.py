"""Off-policy estimate of a candidate version against its on-policy reward on the same queries (issue #7).

    .venv/bin/python benchmarks/bench_ope.py --run ~/.cache/qrloop/runs/<id> [--candidate V] [--queries 40]

Method, on a finished demo run (its own SQLite store and its topics, the default names suffixed with the run
id, see ``qrloop.cli.demo.make_run``):

1. **The log.** Both input topics of the run are read up to their end offsets (``streams.replay.read_topics``,
   what ``qrloop export`` and ``kafka:TOPIC`` sources use). Kept: the first ``--queries`` query events (in
   event time) served by version 1 (the run's start) and their interactions and session ends.
2. **Off-policy.** ``qrloop.cli.evaluate.evaluate_events`` on that log, exactly ``qrloop evaluate``: the
   aggregator's attribution gives each logged rewrite its reward, the candidate's log-probability of the
   logged text is teacher-forced (``model_scorer``), then IPS and SNIPS with 95% intervals and the ESS
   (``learner.ope``). The logged mean reward is version 1's own on-policy value.
3. **On-policy.** The candidate serves every logged query in this process (``qrloop.serving.Rewriter``,
   temperature and top-p from settings, the run's search engine ``simulators.search.SearchEngine``), the
   *same* shopper (the logged ``shopper_id``'s profile from the simulator's pool) reacts through the demo's
   judge (``ClickModelJudge.default`` inside ``ShopperTraffic``: sampled clicks, carts, purchases, delivery
   jitter and duplicates), and each rewrite is scored as the aggregator scores it: ``streams.attribution``'s
   join, dedupe and ``score`` in delivery order. Its 95% interval is a normal one over the per-query means
   of the two rewrites (the two rewrites of a query share the shopper and are not independent).
4. **Control.** Version 1 served live by the same harness (``--no-control`` skips it): its mean should fall
   inside the interval of the logged mean, or the harness differs from the run and the comparison is void.

The candidate was usually trained on pairs from these very queries (the run's versions learned from its
traffic), so the estimate is in-sample: compare the mean weight (1 when the log covers the candidate) and
the ESS before reading the intervals.

Both live runs seed torch and the judge per query from ``--seed`` so they differ only by the policy. Printed
side by side: logged mean of v1, IPS and SNIPS with intervals, ESS, the on-policy mean with its interval,
and whether the on-policy value lies inside each interval. Timings are medians per query. The machine is
shared (2 cores): ``--threads`` (default 1) sets torch's threads and the load average is printed before and
after.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qrloop.cli.demo import run_settings
from qrloop.prompting import Hints
from qrloop.runs import open_store
from qrloop.settings import Settings, get_settings

Z_95 = 1.959963984540054


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def mean_ci(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Mean and normal 95% interval (sample standard error)."""
    x = np.asarray(values, dtype=np.float64)
    half = Z_95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else float("inf")
    return float(x.mean()), (float(x.mean()) - half, float(x.mean()) + half)


def logged_traffic(settings: Settings, version: int, cap: int) -> list[Any]:
    """The first ``cap`` query events served by ``version`` and their feedback, from the run's topics."""
    from qrloop.events import QueryEvent
    from streams.replay import in_event_time_order, parse, read_topics

    t = settings.topics
    events = parse(read_topics(settings.kafka.bootstrap_servers, [t.query_events, t.interactions])).events
    ordered = in_event_time_order(events)
    served = [e for e in ordered if isinstance(e, QueryEvent) and e.policy_version == version][:cap]
    keep = {e.event_id for e in served}
    return [e for e in ordered if (e.event_id if isinstance(e, QueryEvent) else e.query_event_id) in keep]


@dataclass
class LiveRun:
    version: int
    rewards: list[tuple[float, float]]  # per query: (first rewrite, second rewrite)
    seconds: list[float]  # per query: serving (generate + searches)

    @property
    def per_query(self) -> list[float]:
        return [(a + b) / 2 for a, b in self.rewards]


def live_rewards(
    settings: Settings,
    queries: Sequence[Any],
    policy: Any,
    version: int,
    shoppers: Any,
    relevance: Callable[[str, Sequence[str]], Sequence[float]],
    search: Callable[[str], list[str]],
    seed: int,
    hints: Hints | None = None,
) -> LiveRun:
    """Serve each logged query by ``version`` live; the same shopper reacts; rewards as the aggregator's."""
    import torch

    from qrloop.events import Interaction
    from qrloop.serving import Rewriter
    from simulators.driver import feedback_events, lists_of
    from simulators.shoppers import ShopperTraffic
    from streams import attribution

    rewriter = Rewriter(policy, search, settings.rewriter, seed, hints=hints)
    profiles = {p.shopper_id: p for p in shoppers.pool.profiles}
    window_s = settings.streams.attribution_window_s
    run = LiveRun(version, [], [])
    for i, logged in enumerate(queries):
        torch.manual_seed(seed + i)
        started = time.perf_counter()
        event = rewriter.serve(
            logged.query, shopper_id=logged.shopper_id, session_id=f"ope-{i}", event_time=logged.event_time
        )
        run.seconds.append(time.perf_counter() - started)
        # A fresh judge/delivery stream per query, the same for every version: only the policy differs.
        traffic = ShopperTraffic(
            settings, shoppers.catalog, shoppers.judge, seed=seed + i, params=shoppers.params
        )
        simulated = traffic.interactions(profiles[logged.shopper_id], logged.query, lists_of(event))
        interactions, end = feedback_events(event, simulated)
        state = attribution.apply_query(attribution.new_state(now_wall=0.0), event, window_s)
        for item in interactions:
            assert isinstance(item, Interaction)
            attribution.apply_interaction(state, item, window_s)
        attribution.apply_session_end(state, end)
        scored = attribution.score(state, relevance, settings.rewards)
        run.rewards.append((scored.first_reward, scored.second_reward))
    return run


def inside(value: float, ci: tuple[float, float]) -> str:
    return "yes" if ci[0] <= value <= ci[1] else "no"


def fmt_ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run's directory")
    parser.add_argument("--candidate", type=int, default=None, help="version to evaluate (default: the last)")
    parser.add_argument("--queries", type=int, default=40, help="cap on version 1's logged queries")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-control", action="store_true", help="skip version 1 served live")
    args = parser.parse_args()

    import torch

    from learner.ope import model_scorer
    from qrloop.catalog import Catalog
    from qrloop.cli.evaluate import evaluate_events
    from qrloop.events import QueryEvent
    from qrloop.serving import load_stored_version
    from simulators.judge import ClickModelJudge
    from simulators.search import SearchEngine
    from simulators.shoppers import ShopperTraffic
    from streams.aggregator import make_relevance_fn

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"before: {load_average()}")
    settings = run_settings(get_settings(), args.run.expanduser())
    store = open_store(settings)
    candidate = args.candidate or max(v.id for v in store.list())
    policies = {v: load_stored_version(store, store.get(v)) for v in {1, candidate}}
    store.close()

    events = logged_traffic(settings, 1, args.queries)
    queries = [e for e in events if isinstance(e, QueryEvent)]
    print(f"log: {len(queries)} queries served by version 1, {len(events) - len(queries)} feedback events")
    relevance = make_relevance_fn(settings)

    started = time.perf_counter()
    scorer = model_scorer(
        policies[candidate].model, policies[candidate].tokenizer, settings.rewriter.max_new_tokens
    )
    ope = evaluate_events(events, scorer, relevance, settings, f"version {candidate}")
    ope_s = time.perf_counter() - started
    est = ope.estimate

    catalog = Catalog.open(settings)
    # The demo's shoppers: the same seed gives the same profile pool, so a logged shopper id is a profile.
    shoppers = ShopperTraffic(
        settings, catalog, ClickModelJudge.default(settings, catalog), seed=settings.seed
    )
    engine = SearchEngine.open(settings)
    hints = catalog.hints(engine.search)  # a hinted version is served hinted, as `qrloop serve` does
    versions = [candidate] if args.no_control else [candidate, 1]
    live = {
        v: live_rewards(
            settings, queries, policies[v], v, shoppers, relevance, engine.search, args.seed, hints
        )
        for v in versions
    }

    on_mean, on_ci = mean_ci(live[candidate].per_query)
    print(
        f"\noff-policy estimate vs on-policy reward of version {candidate} "
        f"on {len(queries)} of version 1's queries"
    )
    rows = [
        ("logged mean reward, version 1", f"{ope.logged_mean_reward:.4f}", ""),
        ("IPS", f"{est.ips:.4f}", fmt_ci(est.ips_ci)),
        ("SNIPS", f"{est.snips:.4f}", fmt_ci(est.snips_ci)),
        (f"on-policy, version {candidate} (live)", f"{on_mean:.4f}", fmt_ci(on_ci)),
    ]
    if 1 in live:
        ctl_mean, ctl_ci = mean_ci(live[1].per_query)
        rows.append(("control: version 1 live", f"{ctl_mean:.4f}", fmt_ci(ctl_ci)))
    for name, value, ci in rows:
        print(f"  {name:<34} {value:>8}  {ci}")
    print(
        f"  ESS {est.ess:.1f} of {est.n} samples, largest weight {est.max_weight_share:.1%} of the total, "
        f"mean weight {ope.mean_weight:.2f}, mean log-ratio {ope.mean_log_ratio:+.3f}"
    )
    if est.warning:
        print(f"  warning: {est.warning}")
    print(
        f"  on-policy {on_mean:.4f} inside the IPS interval: {inside(on_mean, est.ips_ci)}; "
        f"inside the SNIPS interval: {inside(on_mean, est.snips_ci)}"
    )
    if 1 in live:
        logged = [(a + b) / 2 for a, b in logged_rewards(events, relevance, settings)]
        logged_ci = mean_ci(logged)[1]
        print(
            f"  control inside the logged mean's interval {fmt_ci(logged_ci)}: {inside(ctl_mean, logged_ci)}"
        )
    serve_s = ", ".join(f"v{v} {statistics.median(r.seconds):.2f} s" for v, r in live.items())
    print(f"\ntimes: off-policy scoring {ope_s:.1f} s in all; serving median per query {serve_s}")
    print(f"after: {load_average()}")


def logged_rewards(events: Sequence[Any], relevance: Any, settings: Settings) -> list[tuple[float, float]]:
    """The logged rewrites' rewards per query, as ``evaluate_events`` computes them (the aggregator's)."""
    from streams.replay import attribute

    return [
        (c.scored.first_reward, c.scored.second_reward) for c in attribute(events, relevance, settings).closed
    ]


if __name__ == "__main__":
    main()
