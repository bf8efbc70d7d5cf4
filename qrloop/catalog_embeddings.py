"""Precomputed product embeddings of the catalog: one memory-mapped float32 matrix per data set and encoder.

M1 scores a list as one query encoding plus one embedding per product; a product seen for the first time costs
an encoder forward (see :func:`encode_texts`), and in the aggregator that is most of the time. ``qrloop models
embed-catalog`` (``learner/offline/catalog_embeddings.py``) encodes every product text of the catalog once,
*exactly* as the scorer would (the same function), into ``<cache_dir>/models/catalog-embeddings/<dataset>``;
the scorer then looks a known text up instead of encoding it, with bit-identical vectors, so rewards do not
change and replays stay bit-identical.

The folder holds ``catalog-embeddings.json`` (what the matrix belongs to: the data set, the digest of
the catalog texts it covers, the encoder's identity) and the matrix it names (``embeddings-<token>.npy``,
N × 384). Both are replaced atomically (temp file, rename; the JSON last), so a reader sees an old or a new
pair, never a half-written one. The rows are the catalog's *distinct product texts in catalog order*, so a
matrix built with ``--limit N`` is a valid prefix and a rerun continues where it stopped.

A matrix that does not belong to the catalog or encoder in use is ignored with one WARNING that names the
command rebuilding it: scores then come from on-the-fly encoding, never from another encoder's vectors. As a
last guard, :func:`load_catalog_embeddings` re-encodes a few rows and requires them bit for bit (a torch or
sentence-transformers upgrade can change the last bits without changing the model files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from qrloop.catalog import Catalog
from qrloop.settings import Settings

log = logging.getLogger("qrloop.relevance")

EMBED_COMMAND = "qrloop models embed-catalog"
META = "catalog-embeddings.json"
SPOT_CHECK_ROWS = 3  # rows re-encoded at load: a few forwards (tens of ms) against silently wrong scores

Encode = Callable[[list[str]], np.ndarray]
"""Texts → one unit embedding per row (float32), each a function of its own text (:func:`encode_texts`)."""


PADDED_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
"""Word-piece lengths a text is padded to: the shortest that holds it (a query of 5 word pieces costs 8)."""

# Word pieces in one forward (rows × padded length): texts of one padded length share forwards of exactly
# this many rows, filled up with copies of the first, so every forward of a length has the same shape.
TOKENS_PER_FORWARD = 64


def rows_per_forward(length: int) -> int:
    """Rows in every forward of texts padded to ``length``: one shape per length, whatever is encoded."""
    return max(1, TOKENS_PER_FORWARD // length)


ROWS_PER_FORWARD = rows_per_forward(PADDED_LENGTHS[0])  # the most texts one forward holds

ENCODING = (
    f"each text padded to {'/'.join(map(str, PADDED_LENGTHS))} word pieces, "
    f"{TOKENS_PER_FORWARD} word pieces a forward"
)
"""How :func:`encode_texts` encodes, recorded with a matrix: padded or batched otherwise, the last bits
differ."""


def padded_length(word_pieces: int, max_seq_length: int) -> int:
    """The length a text of ``word_pieces`` (already truncated to the encoder's ``max_seq_length``) is
    padded to: a function of the text alone, never of the texts encoded with it."""
    return min(next((n for n in PADDED_LENGTHS if n >= word_pieces), max_seq_length), max_seq_length)


def encode_texts(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    """Unit embeddings of ``texts`` (float32, one row each) whose bits depend on each text alone.

    Padded to the longest text of a batch, as ``encode`` does, a text's embedding changes in its last bits
    with its neighbours, so a cached product's score would depend on what was scored before it and two replays
    of one log (which interleave partitions differently) would not give bit-identical rewards. Encoded alone
    it does not, but every text then pays a forward that reads all of the encoder's weights for a few tokens:
    15 ms for a query, most of an M1-scoring aggregator's time (issue #17). Here each text is padded to
    :func:`padded_length` of its own length and texts of one length share forwards of exactly
    :func:`rows_per_forward` rows (the last one filled up with copies): a row's bits then depend on its own
    text alone. The row count must not vary: torch 2.15's CPU matrix products give a row other bits when
    64-192 rows of word pieces share a product than when fewer or more do (measured here: a text encoded
    with 3 to 11 others of 16 word pieces differed from the same text encoded alone), so a forward of
    however many texts were at hand is not enough (``tests/test_catalog_embeddings.py`` checks the bits on
    the machine it runs on). The scorer and ``embed-catalog`` both call this, so their vectors are
    identical."""
    import torch

    out = np.empty((len(texts), encoder.get_embedding_dimension()), dtype=np.float32)
    for length, rows in rows_by_padded_length(encoder, texts).items():
        per_forward = rows_per_forward(length)
        for start in range(0, len(rows), per_forward):
            chunk = rows[start : start + per_forward]
            batch = [texts[i] for i in chunk]
            batch += batch[:1] * (per_forward - len(batch))  # the forward's shape never varies
            features = encoder.preprocess(
                batch, processing_kwargs={"text": {"padding": "max_length", "max_length": length}}
            )
            with torch.inference_mode():
                embedded = encoder(features)["sentence_embedding"][: len(chunk)]
                out[chunk] = torch.nn.functional.normalize(embedded, p=2, dim=1).numpy()
    return out


def rows_by_padded_length(encoder: Any, texts: Sequence[str]) -> dict[int, list[int]]:
    """The indices of ``texts`` grouped by the length each is padded to (word pieces counted by the
    encoder's own preprocessing, truncation included)."""
    if not texts:
        return {}
    mask = encoder.preprocess(list(texts))["attention_mask"]
    groups: dict[int, list[int]] = {}
    for i, pieces in enumerate(mask.sum(dim=1).tolist()):
        groups.setdefault(padded_length(int(pieces), int(encoder.max_seq_length)), []).append(i)
    return groups


def embeddings_dir(settings: Settings) -> Path:
    """``models.catalog_embeddings_dir``, else one folder per data set next to M1's."""
    if settings.models.catalog_embeddings_dir is not None:
        return settings.models.catalog_embeddings_dir
    return settings.cache_dir / "models" / "catalog-embeddings" / settings.dataset


def product_texts(catalog: Catalog) -> list[str]:
    """The catalog's distinct product texts in catalog order: the matrix's rows."""
    return list(dict.fromkeys(catalog.text(pid) for pid in catalog.product_ids))


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (NUL-separated: no text contains NUL)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def files_digest(source: Path) -> str:
    """sha256 over every file's name and bytes in an encoder's folder (a fraction of a second for MiniLM)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def encoder_identity(encoder: Any, source: Path) -> dict[str, Any]:
    """What the vectors depend on: the encoder's files, its truncation length, the libraries running it."""
    return {
        "files_sha256": files_digest(source),
        "max_seq_length": int(encoder.max_seq_length),
        "sentence_transformers": metadata.version("sentence-transformers"),
        "torch": metadata.version("torch"),
        "encoding": ENCODING,
        "source": str(source),
    }


def same_encoder(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """The recorded identity matches, the folder's path aside (a moved cache is the same encoder)."""
    return {k: v for k, v in recorded.items() if k != "source"} == {
        k: v for k, v in current.items() if k != "source"
    }


@dataclass(frozen=True)
class CatalogEmbeddings:
    """Unit embeddings of known product texts: ``matrix[rows[text]]`` (memory-mapped, read-only)."""

    rows: dict[str, int]
    matrix: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def vector(self, text: str) -> np.ndarray | None:
        row = self.rows.get(text)
        return None if row is None else self.matrix[row]


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META
    return json.loads(path.read_text()) if path.is_file() else None


def meta_problem(
    meta: dict[str, Any], dataset: str, texts: Sequence[str], identity: dict[str, Any]
) -> str | None:
    """Why a matrix's record does not fit this catalog and encoder (None when it does)."""
    if meta.get("dataset") != dataset:
        return f"built for data set {meta.get('dataset')!r}, not {dataset!r}"
    rows = int(meta.get("rows", -1))
    if not 0 < rows <= len(texts) or meta.get("texts_sha256") != texts_digest(texts[:rows]):
        return "built from another catalog (its product texts differ)"
    if not same_encoder(meta.get("encoder", {}), identity):
        return f"built with another encoder ({meta.get('encoder')}, in use: {identity})"
    return None


def load_catalog_embeddings(
    settings: Settings, dataset: str, texts: Sequence[str], encoder: Any, source: Path
) -> CatalogEmbeddings | None:
    """The precomputed embeddings of the catalog ``texts`` for ``encoder`` (files in ``source``), or None:
    absent (logged at INFO), or not this catalog's / encoder's (one WARNING naming the command that rebuilds
    them). The only I/O of the matrix on the scoring side."""
    folder = embeddings_dir(settings)
    meta = read_meta(folder)
    if meta is None:
        log.info(
            "no precomputed catalog embeddings in %s: products are encoded on first sight (`%s`)",
            folder,
            EMBED_COMMAND,
        )
        return None
    problem = meta_problem(meta, dataset, texts, encoder_identity(encoder, source))
    matrix: np.ndarray | None = None
    if problem is None:
        try:
            matrix = np.load(folder / meta["matrix"], mmap_mode="r")
        except (OSError, ValueError) as exc:
            problem = f"its matrix cannot be read ({exc})"
    if matrix is not None and problem is None:
        problem = matrix_problem(matrix, int(meta["rows"]), texts, lambda t: encode_texts(encoder, t))
    if problem is not None or matrix is None:
        log.warning(
            "ignoring the catalog embeddings in %s: %s; products are encoded on the fly. Rebuild them "
            "with `%s`.",
            folder,
            problem,
            EMBED_COMMAND,
        )
        return None
    rows = int(meta["rows"])
    log.info("catalog embeddings: %d of %d product texts precomputed (%s)", rows, len(texts), folder)
    return CatalogEmbeddings(dict(zip(texts[:rows], range(rows), strict=True)), matrix)


def matrix_problem(matrix: np.ndarray, rows: int, texts: Sequence[str], encode: Encode) -> str | None:
    """Shape and dtype as recorded, and a few rows equal bit for bit to encoding their texts now."""
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != rows:
        return f"its matrix is {matrix.dtype} {matrix.shape}, expected float32 with {rows} rows"
    checked = sorted({0, rows // 2, rows - 1})[:SPOT_CHECK_ROWS]
    fresh = encode([texts[i] for i in checked])
    stored = np.ascontiguousarray(matrix[checked])
    if fresh.shape != stored.shape or fresh.tobytes() != stored.tobytes():
        return f"rows {checked} differ from encoding their texts now (another encoder or library version)"
    return None
