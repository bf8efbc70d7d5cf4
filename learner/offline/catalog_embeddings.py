"""``qrloop models embed-catalog``: the catalog's product embeddings for M1's encoder, precomputed once.

Every distinct product text of the catalog is encoded by :func:`qrloop.catalog_embeddings.encode_texts`
(each text's vector a function of the text alone), the function the scorer itself calls, so a looked-up vector
is bit-identical to one encoded on the fly. Rows are written in catalog order; every ``checkpoint_rows`` the
matrix so far is saved (atomically), so an interrupted run continues where it stopped, and ``--limit N``
builds a valid prefix that a later run extends. Not part of set-up: the 54,667 Home Depot products take
several CPU minutes; an operator who wants aggregator throughput runs it once per data set and encoder.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qrloop.catalog import Catalog
from qrloop.catalog_embeddings import (
    META,
    embeddings_dir,
    encode_texts,
    encoder_identity,
    meta_problem,
    product_texts,
    read_meta,
    texts_digest,
)
from qrloop.data import dataset_name
from qrloop.relevance import apply_torch_threads, configured_kind, embedding_encoder
from qrloop.settings import Settings

PROGRESS_ROWS = 1_000  # texts per encode call (grouped by padded length inside it) between progress reports

Progress = Callable[[int, int], None]
"""(rows done, rows wanted)."""


@dataclass(frozen=True)
class EmbedReport:
    folder: Path
    kind: str  # the M1 kind whose encoder was used ("head", "bi-encoder", or the "cosine" fallback)
    rows: int  # rows in the matrix now
    encoded: int  # rows encoded by this run (0: the matrix already covered what was asked)
    catalog_texts: int
    seconds: float


def embed_catalog(
    settings: Settings,
    *,
    limit: int | None = None,
    checkpoint_rows: int = 5_000,
    progress: Progress | None = None,
) -> EmbedReport:
    """Encode the catalog's first ``limit`` (default: all) distinct product texts into
    :func:`qrloop.catalog_embeddings.embeddings_dir`, continuing from a valid matrix already there."""
    apply_torch_threads(settings)
    started = time.perf_counter()
    folder, kind = configured_kind(settings)
    embedding = embedding_encoder(folder, kind, settings)
    if embedding is None:
        raise ValueError(
            f"M1 in {folder} is a {kind}: it embeds no product alone, there is nothing to precompute"
        )
    encoder, source = embedding
    texts = product_texts(Catalog.open(settings))
    wanted = len(texts) if limit is None else min(limit, len(texts))
    identity = encoder_identity(encoder, source)
    dataset = dataset_name(settings)
    out = embeddings_dir(settings)
    matrix = reusable_rows(out, dataset, texts, identity)
    have = len(matrix)
    blocks = [matrix] if have else []
    for start in range(have, wanted, PROGRESS_ROWS):
        stop = min(start + PROGRESS_ROWS, wanted)
        blocks.append(encode_texts(encoder, texts[start:stop]))
        if stop == wanted or stop // checkpoint_rows > start // checkpoint_rows:
            matrix = np.concatenate(blocks)
            blocks = [matrix]
            write_matrix(out, matrix, dataset, texts[:stop], identity)
        if progress is not None:
            progress(stop, wanted)
    rows = max(have, wanted)
    return EmbedReport(out, kind, rows, rows - have, len(texts), time.perf_counter() - started)


def reusable_rows(folder: Path, dataset: str, texts: list[str], identity: dict[str, Any]) -> np.ndarray:
    """The rows of a matrix already in ``folder`` for this catalog and encoder (an empty array otherwise)."""
    meta = read_meta(folder)
    if meta is None or meta_problem(meta, dataset, texts, identity) is not None:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        return np.array(np.load(folder / meta["matrix"], mmap_mode="r"), dtype=np.float32)
    except (OSError, ValueError):
        return np.zeros((0, 0), dtype=np.float32)


def write_matrix(
    folder: Path, matrix: np.ndarray, dataset: str, texts: list[str], identity: dict[str, Any]
) -> None:
    """Save the matrix under a fresh name, then point the record at it (both by rename), then remove the
    matrices no record names any more: a reader sees the old pair or the new one, never half of either."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"embeddings-{uuid.uuid4().hex[:12]}.npy"
    tmp = folder / f".{name}.tmp"
    with tmp.open("wb") as handle:
        np.save(handle, np.ascontiguousarray(matrix, dtype=np.float32))
    os.replace(tmp, folder / name)
    meta = {
        "dataset": dataset,
        "rows": len(texts),
        "dim": int(matrix.shape[1]),
        "texts_sha256": texts_digest(texts),
        "encoder": identity,
        "matrix": name,
    }
    meta_tmp = folder / f".{META}.tmp"
    meta_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(meta_tmp, folder / META)
    for old in folder.glob("embeddings-*.npy"):
        if old.name != name:
            old.unlink(missing_ok=True)
