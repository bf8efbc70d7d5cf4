"""The simulated search engine, catalog, profiles, click model, shopper traffic and relevance model M1, on the
real Home Depot catalog and the real MiniLM."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learner.offline.relevance import ndcg_at_k, train_relevance
from qrloop.catalog import Catalog, Product
from qrloop.data import Dataset, is_heldout
from qrloop.relevance import KINDS, Kind, RelevanceModel, cosine_scorer
from qrloop.settings import Settings
from simulators.judge import ClickModelJudge, ClickModelParams
from simulators.profiles import ProfilePool
from simulators.search import SearchEngine, ensure_index, s_stem
from simulators.shoppers import ShopperTraffic, SimInteraction, TrafficParams, deliver

# --- shared, expensive objects ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(base_settings: Settings) -> Catalog:
    return Catalog.open(base_settings)


@pytest.fixture(scope="module", params=["tantivy", "bm25s"])
def engine(request: pytest.FixtureRequest, base_settings: Settings, catalog: Catalog) -> SearchEngine:
    return SearchEngine.open(base_settings, request.param, dataset=catalog.dataset)


def label_judge(catalog: Catalog, params: ClickModelParams | None = None) -> ClickModelJudge:
    """The click model on human labels where known and 0.3 elsewhere: deterministic, no model to load."""

    def relevance(query: str, products: Sequence[Product]) -> np.ndarray:
        grades = [catalog.grade(query, p.product_id) for p in products]
        return np.array([0.3 if g is None else g for g in grades])

    return ClickModelJudge(relevance, params or ClickModelParams())


def product(pid: str, *, material: str = "", color: str = "", brand: str = "acme") -> Product:
    return Product(pid, f"product {pid}", color, material, brand, f"product {pid} {color} {material}")


def fixed_relevance(g: float) -> ClickModelJudge:
    return ClickModelJudge(lambda query, products: np.full(len(products), g))


# --- search -------------------------------------------------------------------------------------------------


def test_bm25_beats_a_random_ranking_on_labelled_train_queries(
    catalog: Catalog, engine: SearchEngine
) -> None:
    queries = catalog.dataset.train_queries
    queries = queries[queries["n_labels"] >= 5].sample(200, random_state=0)["query"].tolist()
    all_ids = np.array(catalog.product_ids)
    rng = np.random.default_rng(0)

    def ndcg(query: str, ranked: Sequence[str]) -> float:
        # Gains are human relevance (unlabelled: 0); the ideal ranking is the query's labelled products.
        labelled = catalog.labelled(query)
        ideal = _dcg(sorted(labelled.values(), reverse=True)[:10])
        return _dcg([labelled.get(pid, 0.0) for pid in ranked[:10]]) / ideal if ideal > 0 else 0.0

    found = [ndcg(q, engine.search(q, k=10)) for q in queries]
    chance = [ndcg(q, rng.choice(all_ids, size=10, replace=False).tolist()) for q in queries]
    assert np.mean(found) > 0.25, f"{engine.name} finds labelled relevant products"
    assert np.mean(found) > 20 * (np.mean(chance) + 0.005)


def _dcg(gains: Sequence[float]) -> float:
    return float(sum(g / np.log2(i + 2) for i, g in enumerate(gains)))


def test_ndcg_helper_hand_computed() -> None:
    assert ndcg_at_k([1.0, 0.5, 0.0]) == 1.0
    # DCG = 0 + 0.5/log2(3) + 1/log2(4) = 0.8155; IDCG = 1 + 0.5/log2(3) = 1.3155
    assert ndcg_at_k([0.0, 0.5, 1.0]) == pytest.approx(0.8155 / 1.3155, abs=1e-4)
    assert ndcg_at_k([0.0, 0.0]) == 0.0
    assert ndcg_at_k([0.0] * 10 + [1.0]) == 0.0, "only the top 10 count"


def test_search_edge_cases(engine: SearchEngine) -> None:
    assert engine.search("") == []
    assert engine.search("   ") == []
    assert engine.search("zzqqxx") == [], "no matching word: nothing, not the whole catalog"
    assert len(engine.search("drill", k=3)) == 3
    assert len(engine.search("drill")) == engine.top_k == 10
    syntax = engine.search('AND "drill -bit: OR (')
    assert syntax, "query syntax characters are plain text, never a parse error"
    assert engine.search_many(["drill", "hose"]) == [engine.search("drill"), engine.search("hose")]


def test_s_stemmer_folds_plurals_only() -> None:
    assert [s_stem(w) for w in ("drills", "batteries", "boxes", "glass", "cactus", "bolt")] == [
        "drill",
        "battery",
        "boxe",
        "glass",
        "cactus",
        "bolt",
    ]


def tiny_dataset(titles: list[str]) -> Dataset:
    products = pd.DataFrame(
        {
            "product_id": [str(i) for i in range(len(titles))],
            "title": titles,
            "color": "",
            "material": "",
            "description": "",
            "brand": "",
            "text": titles,
        }
    )
    queries = pd.DataFrame({"query_id": [1], "query": ["drill"], "n_labels": [0], "split": ["train"]})
    labels = pd.DataFrame({"query_id": [], "product_id": [], "grade": [], "relevance": []})
    return Dataset("tiny", products, queries, labels)


@pytest.mark.parametrize("backend", ["tantivy", "bm25s"])
def test_index_is_cached_and_rebuilt_when_the_catalog_changes(tmp_path: Path, backend: str) -> None:
    settings = Settings(cache_dir=tmp_path)
    first = tiny_dataset(["cordless drill", "garden hose", "drill bit set"])
    built = ensure_index(settings, backend, first)
    assert built.built_s is not None and built.folder.parent == tmp_path / "index" / "tiny"
    assert ensure_index(settings, backend, first).built_s is None, "an unchanged catalog loads the cache"
    changed = tiny_dataset(["cordless drill", "garden hose", "hammer drill"])
    rebuilt = ensure_index(settings, backend, changed)
    assert rebuilt.built_s is not None and rebuilt.folder != built.folder
    engine = SearchEngine.open(settings, backend, dataset=changed)
    assert set(engine.search("drill")) == {"0", "2"}
    assert engine.search("hose") == ["1"]


# --- catalog ------------------------------------------------------------------------------------------------


def test_catalog_lookups(catalog: Catalog) -> None:
    p = catalog.product("100001")
    assert (
        p.title.startswith("Simpson Strong-Tie") and p.material == "Galvanized Steel" and p.brand == "simpson"
    )
    labels = catalog.dataset.labels.merge(catalog.dataset.queries, on="query_id").iloc[0]
    raw = str(labels["query"])
    assert catalog.grade(raw, str(labels["product_id"])) == pytest.approx(labels["relevance"])
    assert catalog.grade("  " + raw.upper() + " ", str(labels["product_id"])) == catalog.grade(
        raw, str(labels["product_id"])
    ), "queries match by normalised text"
    assert catalog.grade(raw, "no-such-product") is None
    assert catalog.grade("a query nobody labelled", "100001") is None
    brands = catalog.brands(min_products=100)
    assert "everbilt" in brands and "12" not in brands and "the" not in brands


# --- profiles -----------------------------------------------------------------------------------------------


def test_profiles_are_deterministic_and_draw_brands_from_the_catalog(catalog: Catalog) -> None:
    brands = list(catalog.brands())[:50]
    pool = ProfilePool(7, 200, brands)
    assert pool.profiles == ProfilePool(7, 200, brands).profiles
    assert pool.profiles != ProfilePool(8, 200, brands).profiles
    preferred = {b for p in pool.profiles for b in p.preferred_brands}
    assert preferred and preferred <= set(brands)
    for p in pool.profiles:
        assert len(p.preferred_brands) == {"low": 0, "medium": 2, "high": 3}[p.brand_affinity]
    shares = Counter(p.material_preference is not None for p in pool.profiles)
    assert 0.45 < shares[True] / len(pool) < 0.75, "about 60% of shoppers care about material"
    bio = pool.profiles[0].bio()
    assert pool.profiles[0].region in bio and pool.profiles[0].income in bio


# --- the click model ----------------------------------------------------------------------------------------


def test_click_model_is_monotone_in_relevance_at_the_top(catalog: Catalog) -> None:
    judge = label_judge(catalog)
    profile = ProfilePool(1, 1).profiles[0]
    labelled = catalog.dataset.labels.merge(catalog.dataset.queries, on="query_id")
    checked = 0
    for query, rows in labelled[labelled["n_labels"] >= 8].groupby("query"):
        rows = rows.sort_values("relevance", ascending=False)
        if rows["relevance"].iloc[0] == rows["relevance"].iloc[-1]:
            continue
        products = catalog.products(rows["product_id"].tolist())
        assert judge.expected_clicks(profile, str(query), products) > judge.expected_clicks(
            profile, str(query), products[::-1]
        ), "the most relevant products on top get more clicks than the least relevant on top"
        checked += 1
        if checked == 30:
            break
    assert checked == 30


def test_click_model_hand_computed() -> None:
    params = ClickModelParams()
    profile = dataclasses.replace(
        ProfilePool(0, 1).profiles[0],
        material_preference=None,
        colour_preference=None,
        preferred_brands=(),
        price_sensitivity="low",
        income="middle",
    )
    products = [product("a"), product("b")]
    expected = fixed_relevance(1.0).expected(profile, "q", products)
    a = params.floor + params.span  # g = 1, no bonus
    assert expected["clicks"] == pytest.approx(a * (1 + 1 / 2**params.eta))
    assert expected["add_to_carts"] == pytest.approx(expected["clicks"] * params.cart_rate)
    assert expected["purchases"] == pytest.approx(expected["add_to_carts"] * params.buy_rate)
    assert fixed_relevance(1.0).expected(profile, "q", []) == {
        "impressions": 0.0,
        "clicks": 0.0,
        "add_to_carts": 0.0,
        "purchases": 0.0,
    }


def test_sampled_outcomes_match_the_analytic_expectation() -> None:
    judge = fixed_relevance(0.8)
    profile = ProfilePool(5, 1).profiles[0]
    products = [product(str(i)) for i in range(10)]
    rng = np.random.default_rng(0)
    totals: Counter[str] = Counter()
    runs = 4000
    for _ in range(runs):
        outcome = judge.judge(profile, "q", products, rng)
        totals.update(outcome.counts)
        assert all(
            i >= c >= a >= p
            for i, c, a, p in zip(
                outcome.impressions, outcome.clicks, outcome.add_to_carts, outcome.purchases, strict=True
            )
        ), "each stage only after the previous one"
    expected = judge.expected(profile, "q", products)
    assert totals["impressions"] == 10 * runs
    for kind in ("clicks", "add_to_carts", "purchases"):
        assert totals[kind] / runs == pytest.approx(expected[kind], rel=0.08, abs=0.01), kind


def test_profile_preferences_change_outcomes_in_the_documented_direction(catalog: Catalog) -> None:
    judge = fixed_relevance(0.8)
    base = dataclasses.replace(
        ProfilePool(3, 1).profiles[0],
        material_preference=None,
        colour_preference=None,
        preferred_brands=(),
        brand_affinity="low",
        price_sensitivity="low",
        income="middle",
    )
    steel = [p for p in catalog.products(catalog.product_ids[:3000]) if "Steel" in p.material][:10]
    assert len(steel) == 10
    steel_lover = dataclasses.replace(base, material_preference="steel")
    wood_lover = dataclasses.replace(base, material_preference="wood")
    e_base, e_steel, e_wood = (judge.expected(p, "q", steel) for p in (base, steel_lover, wood_lover))
    assert e_steel["clicks"] > e_base["clicks"], "a material lover clicks more on matching products"
    assert e_steel["add_to_carts"] / e_steel["clicks"] > e_base["add_to_carts"] / e_base["clicks"]
    assert e_wood["clicks"] == pytest.approx(e_base["clicks"]), "a different material changes nothing"

    whites = [product("w1", color="Whites White"), product("w2", color="White")]
    white_lover = dataclasses.replace(base, colour_preference="white")
    assert judge.expected_clicks(white_lover, "q", whites) > judge.expected_clicks(base, "q", whites)

    acme = [product(str(i), brand="acme") for i in range(5)]
    fan = dataclasses.replace(base, preferred_brands=("acme",), brand_affinity="high")
    lukewarm = dataclasses.replace(fan, brand_affinity="medium")
    assert (
        judge.expected_clicks(fan, "q", acme)
        > judge.expected_clicks(lukewarm, "q", acme)
        > judge.expected_clicks(base, "q", acme)
    ), "brand affinity scales the preferred-brand bonus"

    thrifty = dataclasses.replace(base, price_sensitivity="high")
    rich = dataclasses.replace(base, income="luxury")
    e_thrifty, e_rich = judge.expected(thrifty, "q", acme), judge.expected(rich, "q", acme)
    e_plain = judge.expected(base, "q", acme)
    assert e_thrifty["clicks"] == pytest.approx(e_plain["clicks"]), "no price field: clicks unaffected"
    assert e_thrifty["purchases"] < e_plain["purchases"] < e_rich["purchases"]


# --- shopper traffic ----------------------------------------------------------------------------------------


def run_traffic(
    settings: Settings, catalog: Catalog, engine: SearchEngine, seed: int, queries: int = 30
) -> list[tuple[str, str, list[SimInteraction]]]:
    traffic = ShopperTraffic(settings, catalog, label_judge(catalog), seed=seed)
    out = []
    for _ in range(queries):
        _qid, query, profile = traffic.next_query()
        lists = {
            "original": engine.search(query),
            "1": engine.search(query + " kit"),
            "2": engine.search(query),
        }
        out.append((query, profile.shopper_id, traffic.interactions(profile, query, lists)))
    return out


@pytest.fixture(scope="module")
def tantivy(base_settings: Settings, catalog: Catalog) -> SearchEngine:
    return SearchEngine.open(base_settings, "tantivy", dataset=catalog.dataset)


def test_traffic_is_seeded(base_settings: Settings, catalog: Catalog, tantivy: SearchEngine) -> None:
    first = run_traffic(base_settings, catalog, tantivy, seed=11)
    assert first == run_traffic(base_settings, catalog, tantivy, seed=11), "same seed, same stream"
    assert first != run_traffic(base_settings, catalog, tantivy, seed=12)


def test_traffic_never_draws_a_heldout_query(base_settings: Settings, catalog: Catalog) -> None:
    traffic = ShopperTraffic(base_settings, catalog, label_judge(catalog), seed=3)
    drawn = {traffic.next_query()[1] for _ in range(3000)}
    assert len(drawn) > 1000, "traffic spreads over many queries"
    assert not any(is_heldout(q) for q in drawn), "held-out queries never drive traffic"
    heldout = set(catalog.dataset.heldout_queries["query"])
    assert heldout and not drawn & heldout


def test_traffic_events_follow_the_funnel_in_event_time(
    base_settings: Settings, catalog: Catalog, tantivy: SearchEngine
) -> None:
    stream = run_traffic(base_settings, catalog, tantivy, seed=5, queries=60)
    events = [e for _, _, evs in stream for e in evs]
    kinds = Counter(e.kind for e in events)
    assert kinds["impression"] > kinds["click"] > kinds["add_to_cart"] > kinds["purchase"] > 0
    for _, _, evs in stream:
        times: dict[tuple[str, str], dict[str, float]] = {}
        for e in evs:
            times.setdefault((e.list_key, e.product_id), {})[e.kind] = e.delay_s
        for stages in times.values():
            present = [stages[k] for k in ("impression", "click", "add_to_cart", "purchase") if k in stages]
            assert "impression" in stages and present == sorted(present), "causal order in event time"
            assert "add_to_cart" not in stages or "click" in stages
            assert "purchase" not in stages or "add_to_cart" in stages


def synthetic_events(n: int) -> list[SimInteraction]:
    rng = np.random.default_rng(1)
    times = np.sort(rng.uniform(0, n / 10, size=n))  # ten events a second, in event-time order
    return [SimInteraction("original", str(i), i % 10, "click", float(t)) for i, t in enumerate(times)]


def test_duplicates_occur_at_the_configured_rate() -> None:
    events = synthetic_events(20_000)
    for rate in (0.02, 0.1):
        delivered = deliver(events, TrafficParams(duplicate_rate=rate), np.random.default_rng(2))
        duplicates = len(delivered) - len(set(delivered))
        assert len(set(delivered)) == len(events), "every event is delivered"
        assert duplicates / len(events) == pytest.approx(rate, rel=0.15)
    assert len(deliver(events, TrafficParams(duplicate_rate=0.0), np.random.default_rng(2))) == len(events)


def test_jitter_delivers_some_events_out_of_order() -> None:
    events = synthetic_events(5_000)
    jittered = deliver(events, TrafficParams(jitter_s=0.5, duplicate_rate=0.0), np.random.default_rng(3))
    swapped = sum(a.delay_s > b.delay_s for a, b in itertools.pairwise(jittered))
    assert 0.05 < swapped / len(events) < 0.6, "events closer than the jitter overtake each other"
    steady = deliver(events, TrafficParams(jitter_s=0.0, duplicate_rate=0.0), np.random.default_rng(3))
    assert steady == events, "without jitter, delivery keeps event-time order"


# --- the relevance model M1 ---------------------------------------------------------------------------------


def test_relevance_model_falls_back_to_cosine(
    base_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = base_settings.model_copy(
        update={"models": base_settings.models.model_copy(update={"relevance_dir": tmp_path / "none"})}
    )
    with caplog.at_level(logging.WARNING, logger="qrloop.relevance"):
        model = RelevanceModel.load(settings)
    assert model.kind == "cosine"
    assert "qrloop models train-relevance" in caplog.text
    scores = model.score(
        "cordless drill",
        ["DEWALT 20-Volt Max Cordless Drill Kit", "Gardena 50 ft. Garden Hose Green", "Oak Veneer Panel"],
    )
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    assert scores[0] > scores[1], "a drill is closer to 'cordless drill' than a hose"


def test_a_products_score_does_not_depend_on_what_was_scored_before(base_settings: Settings) -> None:
    # Replays of one log must give bit-identical rewards, whichever order the partitions interleave in.
    texts = ["Simpson Strong-Tie 12-Gauge Angle Galvanized Steel", "garden hose 50 ft", "angle bracket"]
    together = cosine_scorer(base_settings)("angle bracket", texts)
    fresh = cosine_scorer(base_settings)
    one_by_one = [float(fresh("angle bracket", [t])[0]) for t in reversed(texts)][::-1]
    assert together.tolist() == one_by_one


def test_relevance_cache_is_lru_and_score_many_keeps_order() -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def scorer(query: str, texts: Sequence[str]) -> np.ndarray:
        calls.append((query, tuple(texts)))
        return np.array([len(t) / 10 for t in texts])

    model = RelevanceModel(scorer, "length", cache_size=2)
    assert model.score("q", ["aa", "bbbb", "aa"]).tolist() == [0.2, 0.4, 0.2]
    assert calls == [("q", ("aa", "bbbb"))], "each distinct text is scored once"
    model.score("q", ["aa"])  # touch "aa": "bbbb" is now the least recently used
    model.score("q", ["ccc"])  # evicts "bbbb"
    model.score("q", ["aa"])
    assert calls[-1] == ("q", ("ccc",)), "'aa' was still cached"
    model.score("q", ["bbbb"])
    assert calls[-1] == ("q", ("bbbb",)), "'bbbb' was evicted"
    assert model.score_many([("q", "aa"), ("r", "b"), ("q", "ccc")]).tolist() == [0.2, 0.1, 0.3]
    assert model.score("q", []).shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_training_run_produces_a_model_that_loads_and_scores(
    base_settings: Settings, tmp_path: Path, kind: Kind
) -> None:
    settings = base_settings.model_copy(
        update={"models": base_settings.models.model_copy(update={"relevance_dir": tmp_path / "m1"})}
    )
    steps: list[int] = []
    report = train_relevance(
        settings,
        max_pairs=64,
        kind=kind,
        heldout_max_queries=3,
        baseline=False,
        progress=lambda step, total, loss: steps.append(step),
    )
    assert report["kind"] == kind and report["train_pairs"] == 64
    assert steps == [1, 2], "64 pairs in batches of 32"
    assert report["heldout"]["queries"] == 3 and report["heldout"]["pairs"] >= 3
    assert not (tmp_path / "m1.tmp").exists(), "the finished model replaced its temporary directory"
    model = RelevanceModel.load(settings)
    assert model.kind == kind
    scores = model.score("angle bracket", ["Simpson Strong-Tie 12-Gauge Angle Galvanized Steel", "hose"])
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_search_and_index() -> None:
    from typer.testing import CliRunner

    from simulators.cli import app

    runner = CliRunner()
    built = runner.invoke(app, ["index"])
    assert built.exit_code == 0 and "tantivy index of 54,667 products" in built.output
    found = runner.invoke(app, ["search", "angle bracket", "-k", "3"], terminal_width=200)
    assert found.exit_code == 0, found.output
    assert "(3 products)" in found.output and "labelled products for this query" in found.output
