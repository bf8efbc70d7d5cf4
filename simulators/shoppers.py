"""Simulated shopper traffic: which query a shopper types, and the click stream their results produce.

Queries come from the **training split only** (held-out queries are for evaluation), preferring queries with
at least ``min_labels`` labelled products so that most of what the judge sees is human-judged. For each list a
shopper saw (the original query's and each rewrite's, keyed ``"original"`` and by rewrite id), the judge
decides the outcome and this module turns it into the events a real click stream carries:

- an **impression** per shown product, ``U(impression_delay_s)`` seconds after the query (the page renders);
- a **click** an exponential ``click_mean_s`` later, an **add-to-cart** an exponential ``cart_mean_s`` after
  the click, a **purchase** an exponential ``purchase_mean_s`` after the add-to-cart. ``delay_s`` is the
  event time, in seconds after the query, so stages of one product are always in causal order *in event
  time*;
- **delivery jitter**: each event arrives a half-normal(``jitter_s``) after it happened, and the list is
  returned in arrival order, so events close in time overtake each other (out of order, as with several
  tracker connections);
- **duplicates**: with probability ``duplicate_rate`` an event is delivered a second time, an exponential
  ``redelivery_mean_s`` after its first arrival (an at-least-once tracker retrying), identical in every field.

Three independent random streams are spawned from the seed (queries and profiles, the judge, delivery), so the
same seed gives the same stream, and swapping the judge does not change which queries and shoppers come.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qrloop.catalog import Catalog
from qrloop.settings import Settings
from simulators.judge import Judge, Outcome
from simulators.profiles import Profile, ProfilePool

Kind = Literal["impression", "click", "add_to_cart", "purchase"]


@dataclass(frozen=True)
class SimInteraction:
    """One interaction as the simulator emits it; the online loop maps it onto the Kafka event schema."""

    list_key: str
    product_id: str
    position: int
    kind: Kind
    delay_s: float


@dataclass(frozen=True)
class TrafficParams:
    impression_delay_s: tuple[float, float] = (0.1, 1.0)
    """Uniform range of the impressions' delay after the query (the results page renders)."""
    click_mean_s: float = 3.0
    """Mean of the exponential delay from impression to click."""
    cart_mean_s: float = 5.0
    """Mean of the exponential delay from click to add-to-cart."""
    purchase_mean_s: float = 8.0
    """Mean of the exponential delay from add-to-cart to purchase."""
    jitter_s: float = 0.5
    """Scale of the half-normal delivery delay: events closer in time than this often swap."""
    duplicate_rate: float = 0.02
    """Probability that an event is delivered twice."""
    redelivery_mean_s: float = 2.0
    """Mean of the exponential delay between an event's first delivery and its duplicate."""
    min_labels: int = 5
    """Draw queries with at least this many labelled products (all training queries if none has)."""
    profiles: int = 500
    """Size of the shopper pool."""
    brands: int = 50
    """Preferred brands are drawn from this many of the catalog's most frequent brands."""


class ShopperTraffic:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        judge: Judge,
        seed: int | None = None,
        params: TrafficParams | None = None,
    ) -> None:
        self.catalog = catalog
        self.judge = judge
        self.params = params or TrafficParams()
        seed = settings.seed if seed is None else seed
        query_seed, judge_seed, delivery_seed = np.random.SeedSequence(seed).spawn(3)
        self._query_rng = np.random.default_rng(query_seed)
        self._judge_rng = np.random.default_rng(judge_seed)
        self._delivery_rng = np.random.default_rng(delivery_seed)
        brands = list(catalog.brands())[: self.params.brands]
        self.pool = ProfilePool(seed, self.params.profiles, brands)
        self.queries = training_queries(catalog, self.params.min_labels)

    def next_query(self) -> tuple[int, str, Profile]:
        """A training query and the shopper who types it."""
        query_id, query = self.queries[int(self._query_rng.integers(len(self.queries)))]
        return query_id, query, self.pool.draw(self._query_rng)

    def interactions(
        self, profile: Profile, query: str, lists: Mapping[str, Sequence[str]]
    ) -> list[SimInteraction]:
        """Every list's interactions in delivery order (jittered, with duplicates).

        ``query`` is the shopper's own (original) query: the judge scores every list against it, since that is
        what the shopper wanted, whichever rewrite retrieved the list.
        """
        events: list[SimInteraction] = []
        for key, product_ids in lists.items():
            products = self.catalog.products(list(product_ids))
            outcome = self.judge.judge(profile, query, products, self._judge_rng)
            events.extend(timeline(key, product_ids, outcome, self.params, self._delivery_rng))
        return deliver(events, self.params, self._delivery_rng)


def training_queries(catalog: Catalog, min_labels: int) -> list[tuple[int, str]]:
    """(query_id, query) of the training split, preferring well-labelled queries; never a held-out one."""
    train = catalog.dataset.train_queries
    preferred = train[train["n_labels"] >= min_labels]
    chosen = preferred if len(preferred) else train
    return [(int(qid), str(q)) for qid, q in zip(chosen["query_id"], chosen["query"], strict=True)]


def timeline(
    key: str,
    product_ids: Sequence[str],
    outcome: Outcome,
    params: TrafficParams,
    rng: np.random.Generator,
) -> list[SimInteraction]:
    """One list's events with their event times (seconds after the query), stage after stage per product."""
    stages: tuple[tuple[Kind, tuple[bool, ...], float], ...] = (
        ("click", outcome.clicks, params.click_mean_s),
        ("add_to_cart", outcome.add_to_carts, params.cart_mean_s),
        ("purchase", outcome.purchases, params.purchase_mean_s),
    )
    events = []
    for position, pid in enumerate(product_ids):
        if not outcome.impressions[position]:
            continue
        t = float(rng.uniform(*params.impression_delay_s))
        events.append(SimInteraction(key, pid, position, "impression", t))
        for kind, flags, mean_s in stages:
            if not flags[position]:
                break
            t += float(rng.exponential(mean_s))
            events.append(SimInteraction(key, pid, position, kind, t))
    return events


def deliver(
    events: Sequence[SimInteraction], params: TrafficParams, rng: np.random.Generator
) -> list[SimInteraction]:
    """Events in arrival order: each arrives a half-normal jitter after it happened, some twice."""
    arrivals: list[tuple[float, int, SimInteraction]] = []
    for i, event in enumerate(events):
        arrival = event.delay_s + abs(float(rng.normal(0.0, params.jitter_s)))
        arrivals.append((arrival, i, event))
        if rng.random() < params.duplicate_rate:
            arrivals.append((arrival + float(rng.exponential(params.redelivery_mean_s)), i, event))
    return [event for _, _, event in sorted(arrivals, key=lambda a: (a[0], a[1]))]
