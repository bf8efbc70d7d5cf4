"""The prepared catalog with fast lookups: product fields by id and human labels by (query, product)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from qrloop.data import Dataset, load_prepared, normalise_query
from qrloop.settings import Settings


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    color: str
    material: str
    brand: str
    text: str


class Catalog:
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        products = dataset.products
        self._products = {
            row.product_id: Product(row.product_id, row.title, row.color, row.material, row.brand, row.text)
            for row in products.itertuples(index=False)
        }
        labels = dataset.labels.merge(dataset.queries[["query_id", "query"]], on="query_id")
        self._labels = {
            (normalise_query(q), pid): float(rel)
            for q, pid, rel in zip(labels["query"], labels["product_id"], labels["relevance"], strict=True)
        }

    @classmethod
    def open(cls, settings: Settings) -> Catalog:
        return cls(load_prepared(settings))

    def __len__(self) -> int:
        return len(self._products)

    def product(self, product_id: str) -> Product:
        return self._products[product_id]

    def products(self, product_ids: list[str]) -> list[Product]:
        return [self._products[p] for p in product_ids]

    def text(self, product_id: str) -> str:
        return self._products[product_id].text

    def grade(self, query: str, product_id: str) -> float | None:
        """Human relevance in [0, 1] where raters judged this (query, product) pair, else None."""
        return self._labels.get((normalise_query(query), product_id))

    def brands(self) -> pd.Series:
        return self.dataset.products["brand"].value_counts()
