"""The catalog's precomputed product embeddings (``qrloop models embed-catalog``): scores through the matrix
are the on-the-fly scores bit for bit, a product outside it still scores, a rerun continues a partial matrix,
and a matrix of another catalog or encoder is refused with one WARNING naming the command that rebuilds it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import qrloop.relevance
from learner.offline.catalog_embeddings import embed_catalog
from qrloop.catalog import Catalog
from qrloop.catalog_embeddings import (
    EMBED_COMMAND,
    META,
    ROWS_PER_FORWARD,
    encode_texts,
    product_texts,
    read_meta,
    rows_by_padded_length,
)
from qrloop.cli.doctor import check_catalog_embeddings
from qrloop.relevance import HEAD_KIND, RelevanceModel, configured_kind, embedding_encoder
from qrloop.settings import Settings

LIMIT = 240  # catalog texts in the test matrix
QUERY = "angle bracket"


def with_matrix_dir(settings: Settings, folder: Path, *, use: bool = True) -> Settings:
    models = settings.models.model_copy(
        update={"catalog_embeddings_dir": folder, "use_catalog_embeddings": use}
    )
    return settings.model_copy(update={"models": models})


@pytest.fixture(scope="module")
def catalog(base_settings: Settings) -> Catalog:
    return Catalog.open(base_settings)


@pytest.fixture(scope="module")
def built(base_settings: Settings, catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A matrix of the catalog's first LIMIT texts, built as the command builds it, in two runs (resumed)."""
    settings = with_matrix_dir(base_settings, tmp_path_factory.mktemp("embeddings"))
    first = embed_catalog(settings, limit=LIMIT // 2, checkpoint_rows=50)
    assert (first.rows, first.encoded) == (LIMIT // 2, LIMIT // 2)
    assert first.kind == HEAD_KIND, "the shared cache has the head M1; the test is about its encoder"
    return settings


def folder_of(settings: Settings) -> Path:
    folder = settings.models.catalog_embeddings_dir
    assert folder is not None
    return folder


def meta_of(folder: Path) -> dict[str, Any]:
    meta = read_meta(folder)
    assert meta is not None
    return meta


def matrix_of(settings: Settings) -> np.ndarray:
    folder = folder_of(settings)
    return np.load(folder / meta_of(folder)["matrix"])


def test_a_rerun_continues_the_matrix_and_leaves_one_file(built: Settings) -> None:
    before = matrix_of(built)
    again = embed_catalog(built, limit=LIMIT // 2)
    assert again.encoded == 0, "the matrix already covered what was asked"
    more = embed_catalog(built, limit=LIMIT, checkpoint_rows=50)
    assert (more.rows, more.encoded) == (LIMIT, LIMIT - LIMIT // 2)
    after = matrix_of(built)
    assert after.shape == (LIMIT, 384) and after.dtype == np.float32
    assert after[: LIMIT // 2].tobytes() == before.tobytes(), "the first run's rows were kept, not redone"
    files = sorted(p.name for p in folder_of(built).iterdir())
    assert len(files) == 2 and META in files, f"one record and the matrix it names, no temp files: {files}"


def test_scores_through_the_matrix_equal_on_the_fly_scores_bit_for_bit(
    built: Settings, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    embed_catalog(built, limit=LIMIT)
    texts = product_texts(catalog)
    inside = texts[:LIMIT:7]
    outside = texts[LIMIT + 3 : LIMIT + 6]
    with caplog.at_level(logging.WARNING, logger="qrloop.relevance"):
        through_matrix = RelevanceModel.load(built, catalog)
    assert through_matrix.precomputed == LIMIT and not caplog.records, caplog.text
    on_the_fly = RelevanceModel.load(with_matrix_dir(built, folder_of(built), use=False), catalog)
    assert on_the_fly.precomputed == 0
    for products in (inside, [*inside[:3], *outside], outside):
        fast, slow = through_matrix.score(QUERY, products), on_the_fly.score(QUERY, products)
        assert fast.tobytes() == slow.tobytes(), (products, fast - slow)
    assert len({round(float(s), 6) for s in through_matrix.score(QUERY, inside)}) > 5, "real, varied scores"


@pytest.mark.parametrize(
    "stale", ["other encoder", "older encoding", "other catalog", "other data set", "other bits"]
)
def test_a_matrix_of_another_catalog_or_encoder_is_refused_with_one_warning(
    built: Settings, catalog: Catalog, tmp_path: Path, stale: str, caplog: pytest.LogCaptureFixture
) -> None:
    embed_catalog(built, limit=LIMIT)
    meta, matrix = meta_of(folder_of(built)), matrix_of(built)
    if stale == "other encoder":
        meta["encoder"]["max_seq_length"] = 256  # the cosine fallback's truncation, not the head's 64
    elif stale == "older encoding":
        del meta["encoder"]["encoding"]  # built one text per forward, before texts shared forwards
    elif stale == "other catalog":
        meta["texts_sha256"] = "0" * 64
    elif stale == "other data set":
        meta["dataset"] = "crowdflower"
    else:  # the record matches, the vectors do not: caught by re-encoding a few rows at load
        matrix = matrix + np.float32(1e-7)
    np.save(tmp_path / meta["matrix"], matrix)
    (tmp_path / META).write_text(json.dumps(meta))
    settings = with_matrix_dir(built, tmp_path)
    with caplog.at_level(logging.WARNING, logger="qrloop.relevance"):
        model = RelevanceModel.load(settings, catalog)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and EMBED_COMMAND in warnings[0].getMessage(), caplog.text
    assert model.precomputed == 0
    texts = product_texts(catalog)[:5]
    fresh = RelevanceModel.load(with_matrix_dir(built, tmp_path, use=False), catalog)
    assert model.score(QUERY, texts).tobytes() == fresh.score(QUERY, texts).tobytes()


def test_the_doctor_reports_the_matrix(built: Settings, tmp_path: Path) -> None:
    embed_catalog(built, limit=LIMIT)
    present = check_catalog_embeddings(built)
    assert present.ok and f"{LIMIT:,} product texts" in present.detail
    absent = check_catalog_embeddings(with_matrix_dir(built, tmp_path / "none"))
    assert absent.ok and "not built" in absent.detail and EMBED_COMMAND in absent.detail
    recorded = meta_of(folder_of(built))
    for key, value, why in (
        ("encoder", {"files_sha256": "f" * 64}, "another encoder"),
        ("encoder", {**recorded["encoder"], "encoding": "one text per forward"}, "encoded otherwise"),
        ("dataset", "crowdflower", "'crowdflower'"),
    ):
        meta = recorded | {key: value}
        (tmp_path / META).write_text(json.dumps(meta))
        stale = check_catalog_embeddings(with_matrix_dir(built, tmp_path))
        assert not stale.ok and why in stale.detail and stale.fix == EMBED_COMMAND, stale


def test_a_texts_vector_is_the_same_bits_whatever_it_is_encoded_with(
    base_settings: Settings, catalog: Catalog
) -> None:
    """encode_texts pads each text to a length of its own, so its vector must not depend on the texts that
    share its forward (padded to the batch's longest text, it would in the last bits)."""
    embedding = embedding_encoder(*configured_kind(base_settings), base_settings)
    assert embedding is not None
    encoder = embedding[0]
    queries = [f"angle bracket {n} inch" for n in range(ROWS_PER_FORWARD + 6)]  # more than one forward
    texts = [*product_texts(catalog)[:40], *queries, "hex bolt " * 80]  # the last one is truncated
    assert len(rows_by_padded_length(encoder, texts)) >= 3, "texts of several padded lengths"
    together = encode_texts(encoder, texts)
    alone = np.concatenate([encode_texts(encoder, [text]) for text in texts])
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = np.empty_like(together)
    shuffled[order] = encode_texts(encoder, [texts[i] for i in order])
    assert together.tobytes() == alone.tobytes() == shuffled.tobytes()
    assert together.shape == (len(texts), 384) and np.allclose(np.linalg.norm(together, axis=1), 1.0)
    as_encode_does = encoder.encode(texts[:40], batch_size=40, normalize_embeddings=True)
    assert not np.array_equal(as_encode_does, together[:40]), "padding to the longest text changes bits"
    assert np.allclose(as_encode_does, together[:40], atol=1e-5), "...and nothing more"


def test_prepared_queries_are_encoded_together_and_not_again_when_scored(
    built: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed_catalog(built, limit=LIMIT)
    model = RelevanceModel.load(built, catalog)
    encoded: list[list[str]] = []

    def counting(encoder: object, texts: list[str]) -> np.ndarray:
        encoded.append(list(texts))
        return encode_texts(encoder, texts)

    monkeypatch.setattr(qrloop.relevance, "encode_texts", counting)
    queries = ["angle bracket", "garden hose", "angle bracket", "deck screws"]
    model.prepare(queries)
    assert encoded == [["angle bracket", "garden hose", "deck screws"]], "one call, each query once"
    products = product_texts(catalog)[:LIMIT:9]  # in the matrix: nothing to encode either
    scores = {query: model.score(query, products) for query in queries}
    assert encoded == [["angle bracket", "garden hose", "deck screws"]], "scoring encoded nothing more"
    fresh = RelevanceModel.load(built, catalog)
    for query, prepared in scores.items():
        assert prepared.tobytes() == fresh.score(query, products).tobytes(), query
