"""Data loaders on the real shared data, the split rule, and clear errors for folders we do not understand."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qrloop import data
from qrloop.settings import Settings


@pytest.fixture(scope="module")
def homedepot(base_settings: Settings) -> data.Dataset:
    return data.load_folder(base_settings.data_dir / "homedepot")


def test_homedepot_row_counts(homedepot: data.Dataset) -> None:
    # The counts the data README documents for the Home Depot training split.
    assert len(homedepot.products) == 54_667
    assert len(homedepot.queries) == 11_795
    assert len(homedepot.labels) == 74_067
    assert homedepot.labels["relevance"].between(0, 1).all()
    assert set(homedepot.labels["product_id"]) <= set(homedepot.products["product_id"])


def test_split_is_deterministic_disjoint_and_about_ten_percent(
    homedepot: data.Dataset, base_settings: Settings
) -> None:
    again = data.load_folder(base_settings.data_dir / "homedepot")
    assert homedepot.queries["split"].tolist() == again.queries["split"].tolist()
    train = set(homedepot.train_queries["query"].map(data.normalise_query))
    heldout = set(homedepot.heldout_queries["query"].map(data.normalise_query))
    assert not train & heldout
    assert 0.08 < len(homedepot.heldout_queries) / len(homedepot.queries) < 0.12
    # The rule depends on the text only, so the same query is on the same side in any data set.
    assert data.is_heldout("Angle  Bracket") == data.is_heldout("angle bracket")


def test_labels_for_split_never_mix(homedepot: data.Dataset) -> None:
    heldout_ids = set(homedepot.heldout_queries["query_id"])
    assert set(homedepot.labels_for("train")["query_id"]).isdisjoint(heldout_ids)


def test_crowdflower_strips_markup(base_settings: Settings) -> None:
    cf = data.load_folder(base_settings.data_dir / "crowdflower")
    assert len(cf.queries) == 261 and len(cf.products) == 9_913
    assert not cf.products["description"].str.contains("<div", regex=False).any()
    assert cf.labels["relevance"].max() == 1.0 and cf.labels["relevance"].min() == 0.0


def test_esci_format_loader(tmp_path: Path) -> None:
    # The Shopping Queries layout that users of the paper bring, in miniature.
    pd.DataFrame(
        {
            "example_id": [1, 2, 3, 4],
            "query": ["red necklace", "red necklace", "maternity shorts", "maternity shorts"],
            "query_id": [7, 7, 9, 9],
            "product_id": ["B1", "B2", "B3", "B9"],
            "product_locale": ["us", "us", "us", "jp"],
            "esci_label": ["E", "I", "S", "E"],
        }
    ).to_parquet(tmp_path / "shopping_queries_dataset_examples.parquet")
    pd.DataFrame(
        {
            "product_id": ["B1", "B2", "B3"],
            "product_title": ["Red Pendant Necklace", "Blue Ring", "Maternity Shorts"],
            "product_description": ["<b>silver</b> chain", None, "soft"],
            "product_bullet_point": ["", "", ""],
            "product_brand": ["A", "B", "C"],
            "product_color": ["Red", "Blue", None],
            "product_locale": ["us", "us", "us"],
        }
    ).to_parquet(tmp_path / "shopping_queries_dataset_products.parquet")
    esci = data.load_folder(tmp_path)
    assert esci.name == "esci"
    assert len(esci.labels) == 3, "non-US rows dropped"
    assert dict(zip(esci.labels["product_id"], esci.labels["relevance"], strict=True)) == {
        "B1": 1.0,
        "B2": 0.0,
        "B3": 0.5,
    }
    assert esci.products.set_index("product_id").loc["B1", "description"] == "silver chain"


def test_unknown_folder_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "products.csv").write_text("id,title\n1,x\n")
    with pytest.raises(data.DataFormatError, match=r"not a data set qrloop understands.*products\.csv"):
        data.load_folder(tmp_path)
    with pytest.raises(data.DataFormatError, match="does not exist"):
        data.load_folder(tmp_path / "missing")


def test_esci_labels_without_text_are_refused_with_the_reason(base_settings: Settings) -> None:
    with pytest.raises(data.DataFormatError, match="without product text"):
        data.load_folder(base_settings.data_dir / "esci_labels_only")


def test_prepare_writes_the_cache_once(base_settings: Settings, tmp_path: Path) -> None:
    settings = base_settings.model_copy(update={"cache_dir": tmp_path, "dataset": "crowdflower"})
    folder = data.prepare(settings)
    first = (folder / "products.parquet").stat().st_mtime_ns
    assert data.prepare(settings) == folder
    assert (folder / "products.parquet").stat().st_mtime_ns == first, "second prepare reuses the cache"
    loaded = data.load_prepared(settings)
    assert len(loaded.products) == 9_913
