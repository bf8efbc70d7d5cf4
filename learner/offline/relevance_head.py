"""The cheap, label-trained relevance model M1: a ridge head on *frozen* all-MiniLM-L6-v2 embeddings.

Fine-tuning MiniLM (``qrloop models train-relevance``) takes about 20 minutes on the shared 2-core box, so
set-up never did it and the loop ran on the untrained cosine. The head needs no backward pass through the
encoder: the training split's queries and products are encoded once (batched, no gradients) and a linear model
on :func:`qrloop.relevance.pair_features` ([u, v, u·v, |u − v|, cos], standardised) is fitted to the human
relevance in [0, 1] in closed form (ridge). Held-out split labels never reach training; the report scores the
head on them (next to the plain cosine when asked), as ``train_relevance`` does.

Measured on the same 500 held-out Home Depot queries (3,117 pairs) as the fine-tuned models, 8,000 training
pairs: plain cosine 0.311 Spearman; ridge λ = 1,000 / 10,000 / 30,000 / 100,000: 0.318 / 0.355 / 0.355 /
0.344; ridge on the interaction features only ([u·v, |u − v|, cos]) at most 0.326; a one-hidden-layer MLP
(16-64 units, BCE, Adam, 60-200 epochs, weight decay 0.01-0.1): 0.238-0.285, worse than the cosine it starts
from, as it learns the training queries rather than relevance. Hence ridge, λ = 10,000.

The labels are all products Home Depot's own search showed for the query, so without more the head never sees
an unrelated product and scores one near the labels' mean (0.445 for ten random products against 0.596 for
the query's own top 10: bench_rewards.py sanity). The simulated shoppers click by M1 where no rater judged a
product, so random lists were clicked half as often as a spelling fix's. ``negatives`` random catalog
products, each paired with a random training query at relevance 0, teach it what unrelated looks like.

Scoring lives in the kernel (``qrloop.relevance``, kind ``head``): product embeddings cached, one query
encoding per list, each product's score computed from its own row only (whatever was scored before).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from learner.offline.relevance import HeldoutQuery, evaluate, heldout_queries
from qrloop.data import load_prepared
from qrloop.models import load_encoder
from qrloop.relevance import (
    HEAD_FILE,
    HEAD_KIND,
    MAX_LENGTH,
    REPORT,
    Head,
    Pairs,
    Scorer,
    apply_torch_threads,
    cosine_scorer,
    load_scorer,
    pair_features,
    relevance_dir,
    training_pairs,
)
from qrloop.settings import Settings

RANDOM_NEGATIVES = 2_000  # a quarter of the 8,000 labelled pairs: see the module's docstring


def outdated(report: dict[str, Any]) -> bool:
    """A head trained before random negatives: set-up retrains it (a fine-tuned M1 is left alone)."""
    return report.get("kind") == HEAD_KIND and "random_negatives" not in report


def embed_unique(encoder: Any, texts: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Unit embeddings of each distinct text, batched (training only: scoring encodes one per forward)."""
    distinct = list(dict.fromkeys(texts))
    vectors = encoder.encode(
        distinct, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    return dict(zip(distinct, np.asarray(vectors, dtype=np.float32), strict=True))


def features_of(pairs: Pairs, vectors: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`pair_features` of every (query, product) pair, one row each."""
    queries = np.stack([vectors[q] for q in pairs.queries])
    products = np.stack([vectors[t] for t in pairs.texts])
    rows = [pair_features(q, p[None, :])[0] for q, p in zip(queries, products, strict=True)]
    return np.stack(rows).astype(np.float32)


def with_random_negatives(pairs: Pairs, product_texts: list[str], count: int, seed: int) -> Pairs:
    """``pairs`` and ``count`` (random training query, random catalog product, relevance 0) triples. A random
    product is almost never relevant to a random query; the few that are cost less than never seeing one."""
    if count <= 0:
        return pairs
    rng = np.random.default_rng(seed)
    queries = [pairs.queries[i] for i in rng.integers(len(pairs), size=count)]
    texts = [product_texts[i] for i in rng.integers(len(product_texts), size=count)]
    targets = np.concatenate([pairs.targets, np.zeros(count, dtype=pairs.targets.dtype)])
    return Pairs([*pairs.queries, *queries], [*pairs.texts, *texts], targets)


def random_product_scores(
    score: Scorer, heldout: list[HeldoutQuery], product_texts: list[str], seed: int
) -> dict[str, float]:
    """Mean M1 score of each held-out query's labelled products and of one random catalog product per query:
    how far below the labelled (shown, mostly relevant) products an unrelated product lands."""
    rng = np.random.default_rng(seed)
    labelled = [float(x) for q in heldout for x in score(q.query, q.texts)]
    unrelated = [float(score(q.query, [product_texts[rng.integers(len(product_texts))]])[0]) for q in heldout]
    return {"labelled_mean": float(np.mean(labelled)), "random_product_mean": float(np.mean(unrelated))}


def fit_head(features: np.ndarray, targets: np.ndarray, *, l2: float = 10_000.0) -> Head:
    """Ridge regression of the targets on the standardised features (closed form, deterministic)."""
    x = features.astype(np.float64)
    y = targets.astype(np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    weight = np.linalg.solve(z.T @ z + l2 * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return Head(mean=mean, scale=scale, weight=weight, bias=float(y.mean()))


def train_relevance_head(
    settings: Settings,
    *,
    max_pairs: int = 8_000,
    negatives: int = RANDOM_NEGATIVES,
    l2: float = 10_000.0,
    heldout_max_queries: int | None = 500,
    baseline: bool = True,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Build the head M1 (``out_dir``, default the data set's M1 directory) and return its report, which is
    also written beside the weights (its presence marks the directory complete)."""
    apply_torch_threads(settings)
    dataset = load_prepared(settings)
    product_texts = dataset.products["text"].tolist()
    labelled = training_pairs(dataset, max_pairs, settings.seed)
    pairs = with_random_negatives(labelled, product_texts, negatives, settings.seed)
    out = out_dir if out_dir is not None else relevance_dir(settings)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    encoder = load_encoder(settings)
    encoder.max_seq_length = MAX_LENGTH
    vectors = embed_unique(encoder, [*pairs.queries, *pairs.texts])
    encode_s = time.perf_counter() - started
    head = fit_head(features_of(pairs, vectors), pairs.targets, l2=l2)
    head.save(tmp / HEAD_FILE)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    heldout = heldout_queries(dataset, heldout_max_queries, settings.seed)
    trained = load_scorer(tmp, HEAD_KIND, settings)  # as the aggregator will load it, from the saved files
    report: dict[str, Any] = {
        "kind": HEAD_KIND,
        "dataset": dataset.name,
        "train_pairs": len(labelled),
        "train_queries": len(set(labelled.queries)),
        "random_negatives": negatives,
        "l2": l2,
        "max_length": MAX_LENGTH,
        "encode_seconds": round(encode_s, 1),
        "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),  # independent of how busy a shared machine is
        "heldout": evaluate(trained, heldout, settings.seed),
        "heldout_scores": random_product_scores(trained, heldout, product_texts, settings.seed),
    }
    if baseline:
        report["heldout_cosine_baseline"] = evaluate(cosine_scorer(settings), heldout, settings.seed)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (tmp / REPORT).write_text(json.dumps(report, indent=2))
    # Swap in the finished directory: a crash never leaves a half-written M1 that looks ready.
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return report
