"""The simulated search engine, profiles and shopper traffic on the real Home Depot catalog."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qrloop.data import is_heldout
from qrloop.relevance import ndcg_at_k
from qrloop.settings import Settings
from simulators.catalog import Catalog, Product
from simulators.judge import ClickModelJudge
from simulators.profiles import ProfilePool
from simulators.search import SearchEngine
from simulators.shoppers import ShopperTraffic, TrafficParams


@pytest.fixture(scope="module")
def catalog(base_settings: Settings) -> Catalog:
    return Catalog.open(base_settings)


@pytest.fixture(scope="module")
def engine(base_settings: Settings) -> SearchEngine:
    return SearchEngine.open(base_settings)


def label_judge(catalog: Catalog) -> ClickModelJudge:
    """Human labels where known, 0.3 elsewhere: fast and deterministic, no model needed."""

    def relevance(query: str, products: list[Product]) -> np.ndarray:
        grades = [catalog.grade(query, p.product_id) for p in products]
        return np.array([0.3 if g is None else g for g in grades])

    return ClickModelJudge(relevance)  # type: ignore[arg-type]


def test_bm25_beats_chance_on_labelled_queries(catalog: Catalog, engine: SearchEngine) -> None:
    queries = catalog.dataset.train_queries
    queries = queries[queries["n_labels"] >= 8].head(200)
    rng = np.random.default_rng(0)
    found, chance = [], []
    for query in queries["query"]:
        ranked = engine.search(query, k=10)
        gains = [catalog.grade(query, pid) or 0.0 for pid in ranked]
        found.append(sum(g >= 0.66 for g in gains))
        random_ids = rng.choice(catalog.dataset.products["product_id"].to_numpy(), size=10)
        chance.append(sum((catalog.grade(query, pid) or 0.0) >= 0.66 for pid in random_ids))
    assert np.mean(found) > 1.0, "BM25 finds labelled relevant products"
    assert np.mean(found) > 20 * (np.mean(chance) + 0.01)


def test_ndcg_helper() -> None:
    assert ndcg_at_k([1.0, 0.5, 0.0]) == 1.0
    assert ndcg_at_k([0.0, 0.5, 1.0]) < 0.7
    assert ndcg_at_k([0.0, 0.0]) == 0.0


def test_search_edge_cases(engine: SearchEngine) -> None:
    assert engine.search("") == []
    assert engine.search("zzqqxx") == [], "no matching term: nothing, not the whole catalog"
    assert len(engine.search("drill", k=3)) == 3


def test_profiles_are_deterministic(catalog: Catalog) -> None:
    brands = tuple(catalog.brands().index[:50])
    assert ProfilePool(7, 50, brands).profiles == ProfilePool(7, 50, brands).profiles
    assert ProfilePool(7, 50, brands).profiles != ProfilePool(8, 50, brands).profiles


def test_click_model_is_monotone_in_relevance_at_the_top(catalog: Catalog) -> None:
    judge = label_judge(catalog)
    profile = ProfilePool(1, 1).profiles[0]
    query = "angle bracket"
    labelled = catalog.dataset.labels.merge(catalog.dataset.queries, on="query_id")
    rows = labelled[labelled["query"] == query].sort_values("relevance", ascending=False)
    products = catalog.products(rows["product_id"].tolist())
    best_first = judge.expected_clicks(profile, query, products)
    worst_first = judge.expected_clicks(profile, query, products[::-1])
    assert best_first > worst_first


def test_profile_preferences_change_clicks_in_the_documented_direction(catalog: Catalog) -> None:
    judge = label_judge(catalog)
    base = ProfilePool(3, 1).profiles[0]
    steel_lover = base.__class__(
        **{**base.__dict__, "material_preference": "steel", "colour_preference": None, "preferred_brands": ()}
    )
    indifferent = base.__class__(**{**steel_lover.__dict__, "material_preference": None})
    steel = [
        p
        for p in catalog.products(catalog.dataset.products["product_id"].head(3000).tolist())
        if "steel" in p.material.lower()
    ][:10]
    assert judge.expected_clicks(steel_lover, "bracket", steel) > judge.expected_clicks(
        indifferent, "bracket", steel
    )


def test_traffic_is_seeded_trains_only_and_duplicates_and_reorders(
    base_settings: Settings, catalog: Catalog, engine: SearchEngine
) -> None:
    params = TrafficParams(duplicate_rate=0.05)

    def stream(seed: int) -> list:
        traffic = ShopperTraffic(base_settings, catalog, label_judge(catalog), seed=seed, params=params)
        out = []
        for _ in range(40):
            _qid, query, profile = traffic.next_query()
            assert not is_heldout(query), "held-out queries never drive traffic"
            lists = {"original": engine.search(query), "r1": engine.search(query + " kit")}
            out.append((query, profile.shopper_id, traffic.interactions(profile, query, lists)))
        return out

    first, again = stream(11), stream(11)
    assert first == again, "same seed, same stream"
    events = [e for _, _, evs in first for e in evs]
    kinds = Counter(e.kind for e in events)
    assert kinds["impression"] > kinds["click"] > kinds["add_to_cart"] >= kinds["purchase"]
    duplicates = sum(evs[i] == evs[i + 1] for _, _, evs in first for i in range(len(evs) - 1))
    assert 0.01 < duplicates / len(events) < 0.10
    out_of_order = sum(
        evs[i].delay_s > evs[i + 1].delay_s for _, _, evs in first for i in range(len(evs) - 1)
    )
    assert out_of_order > 0, "jitter delivers some events out of order"
    for _, _, evs in first:
        clicked = {(e.list_key, e.product_id) for e in evs if e.kind == "click"}
        carted = {(e.list_key, e.product_id) for e in evs if e.kind == "add_to_cart"}
        assert carted <= clicked, "add-to-cart only after a click"
