"""The catalog's spelling: which words it corrects, towards what, and how a hinted prompt uses it."""

from __future__ import annotations

import pytest

from learner import evaluate_online as ev
from qrloop.catalog import Catalog
from qrloop.prompting import RESULT_DEPTH, result_words, results_hints
from qrloop.settings import Settings
from qrloop.spelling import CatalogSpeller, edits1
from simulators.search import SearchEngine

TITLES = [
    *["Ryobi 18-Volt Cordless Drill"] * 3,
    *["Chaise Lounge Cushion in Blue"] * 2,
    "Chaise Lounge Frame",
    *["Storage Case for Tools"] * 4,
    *["Stacking Shelf"] * 3,
    "Cordless Impact Driver",
]


@pytest.fixture(scope="module")
def speller() -> CatalogSpeller:
    return CatalogSpeller(TITLES)


def test_edits1_holds_each_kind_of_one_letter_edit() -> None:
    near = edits1("cordles")
    assert {"cordless", "corles", "cordels", "cordlas"} <= near  # insert, delete, transpose, replace
    assert "cordlesss" not in near  # two inserts


def test_a_word_few_titles_use_is_corrected_towards_the_word_most_titles_use_with_the_rest(
    speller: CatalogSpeller,
) -> None:
    assert speller.correct("cordles drill") == "cordless drill"
    # "case" (4 titles) and "chaise" (3) are both one edit from "chase"; only "chaise" is used with "lounge"
    assert speller.corrections("Chase Lounge") == {"chase": "chaise"}
    assert speller.correct("chase") == "case"  # no other word: the more common one


def test_known_words_numbers_and_sizes_are_left_as_typed(speller: CatalogSpeller) -> None:
    assert speller.corrections("cordless drill") == {}
    assert speller.corrections("stacking shelfs") == {}  # the other number of a known word is no typo
    assert speller.corrections("18-volt 20x8 drill") == {}
    assert speller.corrections("qwzx drill") == {}  # nothing the catalog uses is near it


def test_hints_search_the_corrected_query_and_lead_with_it(speller: CatalogSpeller) -> None:
    asked: list[str] = []

    def search(query: str, k: int) -> list[str]:
        assert k == RESULT_DEPTH
        asked.append(query)
        return [str(i) for i in range(3)]  # the Ryobi titles

    hints = results_hints(search, lambda product: TITLES[int(product)], n=3, correct=speller.correct)
    assert hints("Cordles  drill") == ["cordless drill", "ryobi", "volt"]
    assert hints("drill") == ["ryobi", "volt", "cordless"]  # nothing to correct: the results' words alone
    assert hints("Cordless drill") == ["ryobi", "volt"]  # only case and spacing differ: nothing corrected
    assert asked == ["cordless drill", "drill", "cordless drill"]


def test_the_real_catalog_corrects_known_home_depot_misspellings(base_settings: Settings) -> None:
    # Real pairs from hd_query_spell_corrections.csv, each corrected by one edit the titles' counts decide
    catalog = Catalog.open(base_settings)
    speller = catalog.speller
    cases = [
        ("1 1/4 galvenized steel pipe fittings", "1 1/4 galvanized steel pipe fittings"),
        ("30 gal electirc water heater", "30 gal electric water heater"),
        ("3/8 viyl j channel", "3/8 vinyl j channel"),
        ("4 flourescent", "4 fluorescent"),
    ]
    for wrong, right in cases:
        fixed = speller.correct(wrong)
        assert ev.corrects(wrong, right, fixed), (wrong, fixed)
    assert speller.corrections("cordless drill") == {}
    # The hint line a hinted policy is shown for the typo leads with the corrected query, and the rest are the
    # words of the corrected query's results (the typed query's top 30 are whatever "4" finds)
    engine = SearchEngine.open(base_settings, dataset=catalog.dataset)
    typed = catalog.hints(engine.search)("4 flourescent")
    assert typed[0] == "4 fluorescent"
    fixed_results = map(catalog.title, engine.search("4 fluorescent", RESULT_DEPTH))
    assert typed[1:] == result_words("4 fluorescent", fixed_results)[:9]
