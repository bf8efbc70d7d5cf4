"""Real product-search data in one internal format.

Every loader turns a source folder into the same three tables, written once into the cache:

- ``products``: product_id (str), title, color, material, description, brand, text (what search indexes)
- ``queries``:  query_id (int), query, n_labels, split (``train`` or ``heldout``)
- ``labels``:   query_id, product_id, grade (the source's own scale), relevance (grade mapped to [0, 1])

The train / held-out split is one rule for every data set and component (see :func:`is_heldout`): a query is
held out when the SHA-256 of its normalised text is 0 mod 10. Hashing the *text* (not a source id) keeps the
split stable when a data set is re-exported with new ids, and a query that appears in two data sets lands on
the same side in both. About 10% of queries are held out; their labels never feed training (the relevance
model, Q2Q pairs, the online loop's traffic).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from policy_store.blobs import private_dir
from qrloop.settings import Settings

FORMAT_VERSION = 1
HELDOUT_MODULUS = 10


class DataFormatError(ValueError):
    """A folder qrloop does not know how to read."""


@dataclass(frozen=True)
class Dataset:
    name: str
    products: pd.DataFrame
    queries: pd.DataFrame
    labels: pd.DataFrame

    @property
    def train_queries(self) -> pd.DataFrame:
        return self.queries[self.queries["split"] == "train"]

    @property
    def heldout_queries(self) -> pd.DataFrame:
        return self.queries[self.queries["split"] == "heldout"]

    def labels_for(self, split: str) -> pd.DataFrame:
        ids = self.queries.loc[self.queries["split"] == split, "query_id"]
        return self.labels[self.labels["query_id"].isin(ids)]


def normalise_query(text: str) -> str:
    return " ".join(text.lower().split())


def is_heldout(query: str) -> bool:
    digest = hashlib.sha256(normalise_query(query).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def guess_brand(title: str) -> str:
    """Brand is not a field in our catalogs; on Home Depot titles it is almost always the first word
    ("BEHR Premium ...", "Simpson Strong-Tie ..."). Good enough for a shopper's brand affinity."""
    first = title.split(" ", 1)[0] if title else ""
    return re.sub(r"[^\w&'-]", "", first).lower()


_TAG = re.compile(r"<[^>]+>|\{[^}]*\}")


def _strip_markup(text: str) -> str:
    # About 1% of CrowdFlower descriptions carry raw HTML/CSS from the listing page.
    return " ".join(_TAG.sub(" ", text).split())


def _finish(name: str, products: pd.DataFrame, queries: pd.DataFrame, labels: pd.DataFrame) -> Dataset:
    products = products.copy()
    for col in ("color", "material", "description"):
        if col not in products:
            products[col] = ""
        products[col] = products[col].fillna("").astype(str)
    products["title"] = products["title"].fillna("").astype(str)
    products["product_id"] = products["product_id"].astype(str)
    products["brand"] = products["title"].map(guess_brand)
    products["text"] = (
        (products["title"] + " " + products["color"] + " " + products["material"]).str.split().str.join(" ")
    )
    queries = queries.copy()
    queries["query"] = queries["query"].astype(str)
    queries["split"] = ["heldout" if is_heldout(q) else "train" for q in queries["query"]]
    labels = labels.copy()
    labels["product_id"] = labels["product_id"].astype(str)
    cols_p = ["product_id", "title", "color", "material", "description", "brand", "text"]
    cols_q = ["query_id", "query", "n_labels", "split"]
    cols_l = ["query_id", "product_id", "grade", "relevance"]
    return Dataset(
        name,
        products[cols_p].reset_index(drop=True),
        queries[cols_q].reset_index(drop=True),
        labels[cols_l].reset_index(drop=True),
    )


def load_homedepot(folder: Path) -> Dataset:
    products = pd.read_parquet(folder / "hd_products.parquet").rename(
        columns={
            "product_uid": "product_id",
            "product_title": "title",
            "product_color": "color",
            "product_material": "material",
        }
    )
    queries = pd.read_parquet(folder / "hd_queries.parquet")
    labels = pd.read_parquet(folder / "hd_labels.parquet").rename(columns={"product_uid": "product_id"})
    labels["grade"] = labels["relevance"].astype(float)
    labels["relevance"] = (labels["grade"] - 1.0) / 2.0  # 1 irrelevant .. 3 perfect match
    return _finish("homedepot", products, queries, labels)


def load_crowdflower(folder: Path) -> Dataset:
    products = pd.read_parquet(folder / "cf_products.parquet").rename(
        columns={"product_title": "title", "product_description": "description"}
    )
    products["description"] = products["description"].fillna("").map(_strip_markup)
    queries = pd.read_parquet(folder / "cf_queries.parquet")
    labels = pd.read_parquet(folder / "cf_labels.parquet")
    labels["grade"] = labels["median_relevance"].astype(float)
    labels["relevance"] = (labels["grade"] - 1.0) / 3.0  # 1 irrelevant .. 4 full match
    return _finish("crowdflower", products, queries, labels)


# ESCI gains as in the paper's data set: Exact > Substitute > Complement > Irrelevant.
ESCI_RELEVANCE = {"E": 1.0, "S": 0.5, "C": 0.25, "I": 0.0}


def load_esci(folder: Path) -> Dataset:
    """The Shopping Queries data set as its users bring it (US locale)."""
    examples = pd.read_parquet(folder / "shopping_queries_dataset_examples.parquet")
    products = pd.read_parquet(folder / "shopping_queries_dataset_products.parquet")
    if "product_locale" in examples:
        examples = examples[examples["product_locale"] == "us"]
        products = products[products["product_locale"] == "us"]
    products = products.rename(
        columns={"product_title": "title", "product_color": "color", "product_description": "description"}
    )
    products["material"] = ""
    products["description"] = products["description"].fillna("").map(_strip_markup)
    products = products.drop_duplicates("product_id")
    qids = {q: i + 1 for i, q in enumerate(dict.fromkeys(examples["query"]))}
    labels = pd.DataFrame(
        {
            "query_id": examples["query"].map(qids),
            "product_id": examples["product_id"],
            "grade": examples["esci_label"],
            "relevance": examples["esci_label"].map(ESCI_RELEVANCE),
        }
    )
    counts = labels.groupby("query_id").size()
    queries = pd.DataFrame({"query_id": list(qids.values()), "query": list(qids.keys())})
    queries["n_labels"] = queries["query_id"].map(counts).fillna(0).astype(int)
    return _finish("esci", products, queries, labels)


# (files that identify the format, loader); checked in order.
LOADERS: list[tuple[tuple[str, ...], Callable[[Path], Dataset]]] = [
    (("hd_products.parquet", "hd_queries.parquet", "hd_labels.parquet"), load_homedepot),
    (("cf_products.parquet", "cf_queries.parquet", "cf_labels.parquet"), load_crowdflower),
    (("shopping_queries_dataset_examples.parquet", "shopping_queries_dataset_products.parquet"), load_esci),
]


def load_folder(folder: Path) -> Dataset:
    """Read a source folder in whichever known format it holds, or say clearly what was expected."""
    if not folder.is_dir():
        raise DataFormatError(f"data folder {folder} does not exist (set QRLOOP_DATA_DIR / QRLOOP_DATASET)")
    present = {p.name for p in folder.iterdir()}
    for required, loader in LOADERS:
        if set(required) <= present:
            return loader(folder)
    if "esci150_judgments.parquet" in present:
        raise DataFormatError(
            f"{folder} holds ESCI labels without product text; it cannot drive a catalog. "
            "Bring shopping_queries_dataset_examples.parquet and shopping_queries_dataset_products.parquet."
        )
    expected = "; ".join(", ".join(req) for req, _ in LOADERS)
    raise DataFormatError(
        f"{folder} is not a data set qrloop understands (found: {sorted(present) or 'nothing'}). "
        f"Expected one of: {expected}"
    )


def source_folder(settings: Settings) -> Path:
    """``dataset`` is a folder name under ``data_dir`` or a path of its own."""
    candidate = Path(settings.dataset).expanduser()
    if candidate.is_absolute() or len(candidate.parts) > 1:
        return candidate
    return settings.data_dir / settings.dataset


def prepare(settings: Settings, force: bool = False) -> Path:
    """Build the internal tables into the cache once; return their folder."""
    out = settings.prepared_data_dir
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") == FORMAT_VERSION:
            return out
    dataset = load_folder(source_folder(settings))
    private_dir(out)
    for name in ("products", "queries", "labels"):
        tmp = out / f".{name}.parquet.tmp"
        getattr(dataset, name).to_parquet(tmp, index=False)
        tmp.replace(out / f"{name}.parquet")
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.name,
        "source": str(source_folder(settings)),
        "products": len(dataset.products),
        "queries": len(dataset.queries),
        "heldout_queries": len(dataset.heldout_queries),
        "labels": len(dataset.labels),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def dataset_name(settings: Settings) -> str:
    """The configured data set's name as its loader gives it (``homedepot``, ``crowdflower``, ``esci``): what
    models trained on it record, so that one data set's model is never silently used on another."""
    meta_path = settings.prepared_data_dir / "meta.json"
    if meta_path.is_file():
        return str(json.loads(meta_path.read_text())["dataset"])
    return Path(settings.dataset).name


def load_prepared(settings: Settings) -> Dataset:
    """The prepared tables; prepares them first when the cache is empty."""
    folder = prepare(settings)
    meta = json.loads((folder / "meta.json").read_text())
    return Dataset(
        meta["dataset"],
        pd.read_parquet(folder / "products.parquet"),
        pd.read_parquet(folder / "queries.parquet"),
        pd.read_parquet(folder / "labels.parquet"),
    )
