"""Simulated shopper traffic: which query a shopper types, and the click stream their results produce.

Queries come from the *training* split only (held-out queries are for evaluation). For each list a shopper
saw (the original query's and each rewrite's), the judge decides the outcome and this module turns it into
the events a real click stream would carry: an impression per shown product, then clicks, add-to-carts and
purchases, each later than the stage before it by an exponential delay. Delivery is jittered so some events
arrive out of order, and a small share is duplicated, as at-least-once trackers do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qrloop.settings import Settings
from simulators.catalog import Catalog
from simulators.judge import Judge
from simulators.profiles import Profile, ProfilePool

Kind = Literal["impression", "click", "add_to_cart", "purchase"]


@dataclass(frozen=True)
class SimInteraction:
    list_key: str
    product_id: str
    position: int
    kind: Kind
    delay_s: float


@dataclass(frozen=True)
class TrafficParams:
    impression_delay_s: tuple[float, float] = (0.1, 1.0)  # uniform: the results page renders
    click_mean_s: float = 3.0  # exponential, after the impression
    cart_mean_s: float = 5.0  # after the click
    purchase_mean_s: float = 8.0  # after the add-to-cart
    jitter_s: float = 0.5  # normal delivery jitter: events overtake each other
    duplicate_rate: float = 0.02  # share of events delivered twice
    min_labels: int = 5  # prefer queries with this many labelled products (their lists are judged by humans)
    profiles: int = 500


class ShopperTraffic:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        judge: Judge,
        seed: int,
        params: TrafficParams = TrafficParams(),
    ) -> None:
        self.catalog = catalog
        self.judge = judge
        self.params = params
        self.rng = np.random.default_rng(seed)
        brands = tuple(catalog.brands().index[:50])
        self.pool = ProfilePool(seed, params.profiles, brands)
        train = catalog.dataset.train_queries
        preferred = train[train["n_labels"] >= params.min_labels]
        self.queries = (preferred if len(preferred) else train)[["query_id", "query"]].itertuples(index=False)
        self.queries = list(self.queries)
        del settings  # the traffic's knobs are its params; settings only pick the catalog and judge

    def next_query(self) -> tuple[int, str, Profile]:
        row = self.queries[int(self.rng.integers(len(self.queries)))]
        return int(row.query_id), str(row.query), self.pool.draw(self.rng)

    def interactions(
        self, profile: Profile, query: str, lists: Mapping[str, Sequence[str]]
    ) -> list[SimInteraction]:
        """Every list's interactions in delivery order (jittered, with duplicates)."""
        events: list[SimInteraction] = []
        for key, product_ids in lists.items():
            outcome = self.judge.judge(profile, query, self.catalog.products(list(product_ids)), self.rng)
            events.extend(self._stream(key, product_ids, outcome))
        return self._deliver(events)

    def _stream(self, key: str, product_ids: Sequence[str], outcome: object) -> list[SimInteraction]:
        p, rng, out = self.params, self.rng, outcome
        events = []
        for position, pid in enumerate(product_ids):
            t = float(rng.uniform(*p.impression_delay_s))
            events.append(SimInteraction(key, pid, position, "impression", t))
            stages: tuple[tuple[Kind, tuple[bool, ...], float], ...] = (
                ("click", out.clicks, p.click_mean_s),  # type: ignore[attr-defined]
                ("add_to_cart", out.add_to_carts, p.cart_mean_s),  # type: ignore[attr-defined]
                ("purchase", out.purchases, p.purchase_mean_s),  # type: ignore[attr-defined]
            )
            for kind, flags, mean in stages:
                if not flags[position]:
                    break
                t += float(rng.exponential(mean))
                events.append(SimInteraction(key, pid, position, kind, t))
        return events

    def _deliver(self, events: list[SimInteraction]) -> list[SimInteraction]:
        p, rng = self.params, self.rng
        arrival = [e.delay_s + float(rng.normal(0, p.jitter_s)) for e in events]
        delivered = [e for _, e in sorted(zip(arrival, events, strict=True), key=lambda x: x[0])]
        duplicated: list[SimInteraction] = []
        for event in delivered:
            duplicated.append(event)
            if rng.random() < p.duplicate_rate:
                duplicated.append(event)
        return duplicated
