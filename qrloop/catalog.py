"""The prepared catalog with fast lookups: product fields by id and human labels by (query, product).

Pure lookups over a :class:`qrloop.data.Dataset` (any loader's); :meth:`Catalog.open` is the only I/O.
Labels are keyed by the *normalised* query text (``qrloop.data.normalise_query``), so "Angle  Bracket" and
"angle bracket" find the same human judgements, as they would in the raters' sheet.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from qrloop.data import Dataset, load_prepared, normalise_query
from qrloop.prompting import DeepSearch, Hints, results_hints
from qrloop.settings import Settings
from qrloop.spelling import CatalogSpeller

# A brand token is a word (letters, digits inside, '&', '-', "'"), not a size like "12" or "1/2".
_BRANDLIKE = re.compile(r"^[a-z][a-z0-9&'-]+$")
# First words of titles that describe rather than name a maker ("The ...", "Commercial Electric ..." stays).
_NOT_BRANDS = frozenset({"the", "a", "an", "new", "set", "pack"})


@dataclass(frozen=True)
class Product:
    """What a shopper (and the judge) sees of a product."""

    product_id: str
    title: str
    color: str
    material: str
    brand: str
    text: str


class Catalog:
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._products = {
            row.product_id: Product(row.product_id, row.title, row.color, row.material, row.brand, row.text)
            for row in dataset.products.itertuples(index=False)
        }
        labels = dataset.labels.merge(dataset.queries[["query_id", "query"]], on="query_id")
        self._labels: dict[str, dict[str, float]] = {}
        for query, pid, rel in zip(labels["query"], labels["product_id"], labels["relevance"], strict=True):
            self._labels.setdefault(normalise_query(query), {})[pid] = float(rel)

    @classmethod
    def open(cls, settings: Settings) -> Catalog:
        return cls(load_prepared(settings))

    def __len__(self) -> int:
        return len(self._products)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._products

    @property
    def product_ids(self) -> list[str]:
        return list(self._products)

    def product(self, product_id: str) -> Product:
        return self._products[product_id]

    def products(self, product_ids: Sequence[str]) -> list[Product]:
        return [self._products[p] for p in product_ids]

    def text(self, product_id: str) -> str:
        return self._products[product_id].text

    def title(self, product_id: str) -> str:
        return self._products[product_id].title

    @cached_property
    def speller(self) -> CatalogSpeller:
        """The catalog's spelling, over its titles (built on first use: a quarter of a second)."""
        return CatalogSpeller(product.title for product in self._products.values())

    def hints(self, search: DeepSearch) -> Hints:
        """What a hinted policy's prompt shows for a query: its results' words in ``search`` over this
        catalog, the query searched as the catalog spells it (:func:`qrloop.prompting.results_hints`)."""
        return results_hints(search, self.title, correct=self.speller.correct)

    def grade(self, query: str, product_id: str) -> float | None:
        """Human relevance in [0, 1] where raters judged this (query, product) pair, else None."""
        return self._labels.get(normalise_query(query), {}).get(product_id)

    def labelled(self, query: str) -> dict[str, float]:
        """Every product raters judged for this query, with its relevance in [0, 1] (empty if none)."""
        return dict(self._labels.get(normalise_query(query), {}))

    def brands(self, min_products: int = 1) -> dict[str, int]:
        """Brand-like tokens of the catalog's brand field with their product counts, most frequent first.

        Sizes ("12", "1/2") and articles are dropped: they are first words of titles, not makers.
        """
        counts = self.dataset.products["brand"].value_counts()
        kept = [
            (str(b), int(n))
            for b, n in counts.items()
            if n >= min_products and _BRANDLIKE.match(str(b)) and b not in _NOT_BRANDS
        ]
        # Ties broken by name: the order (and so the seeded profile pool) never depends on sort stability.
        return dict(sorted(kept, key=lambda item: (-item[1], item[0])))
