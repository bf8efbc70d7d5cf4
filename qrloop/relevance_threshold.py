"""τ of the gain reward: the M1 score from which a product counts as relevant, calibrated on human labels.

The gain (``qrloop.rewards``) pays only for new products above τ, so τ decides whether a random list can earn
anything. A fixed number would be wrong for some M1: the untrained cosine fallback and a label-trained model
put the same products on different scales. So τ is measured for the model in use: on a seeded sample of
*training-split* labels (held-out labels never tune anything), the score that best separates products humans
judged relevant (relevance ≥ 0.75, i.e. Home Depot grade ≥ 2.5) from the rest, by balanced accuracy (Youden's
J: true-positive rate + true-negative rate − 1). The labelled products are search results for their query,
so the negatives are hard ones (near misses), and τ is stricter than what separates relevant from random.

The result is cached per data set and model (``<cache_dir>/data/<dataset>/relevant-above-<model>.json``), so
M1 scores the sample once per machine (about a minute on two busy cores); ``rewards.relevant_above`` set in
the settings skips the calibration altogether.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qrloop.catalog_embeddings import ENCODING
from qrloop.data import Dataset
from qrloop.relevance import RelevanceModel, read_report, relevance_dir, training_pairs
from qrloop.settings import Settings

log = logging.getLogger("qrloop.relevance")

RELEVANT_FROM = 0.75  # human relevance in [0, 1]; Home Depot (grade − 1) / 2 ≥ 0.75 ⇔ grade ≥ 2.5
CALIBRATION_PAIRS = 600


@dataclass(frozen=True)
class Threshold:
    value: float
    balanced_accuracy: float
    positives: int
    negatives: int
    model: str


def best_threshold(scores: Sequence[float] | np.ndarray, relevant: Sequence[bool] | np.ndarray) -> float:
    """The score cut that maximises balanced accuracy (Youden's J) between relevant and other items.

    Candidates are the midpoints between consecutive distinct scores; ties go to the lowest cut. Raises
    when one class is empty (no cut can separate what is not there).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(relevant, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("calibrating a threshold needs both relevant and irrelevant labelled items")
    distinct = np.unique(s)
    cuts = np.concatenate([[distinct[0]], (distinct[1:] + distinct[:-1]) / 2])
    tpr = (s[y][None, :] >= cuts[:, None]).mean(axis=1)
    tnr = (s[~y][None, :] < cuts[:, None]).mean(axis=1)
    return float(cuts[int(np.argmax(tpr + tnr - 1))])


def calibrate(
    model: RelevanceModel,
    dataset: Dataset,
    pairs: int = CALIBRATION_PAIRS,
    seed: int = 0,
    relevant_from: float = RELEVANT_FROM,
) -> Threshold:
    """τ for ``model`` on a seeded sample of the data set's training-split labels."""
    sample = training_pairs(dataset, pairs, seed)
    scores = model.score_many(zip(sample.queries, sample.texts, strict=True))
    relevant = sample.targets >= relevant_from
    value = best_threshold(scores, relevant)
    accuracy = ((scores[relevant] >= value).mean() + (scores[~relevant] < value).mean()) / 2
    return Threshold(value, float(accuracy), int(relevant.sum()), int((~relevant).sum()), model.kind)


def model_identity(settings: Settings, model: RelevanceModel) -> str:
    """The exact M1 in use: its kind plus a digest of its training report (retraining changes it) and of how
    texts are encoded (``ENCODING``: the scores' last bits, and so τ's, depend on it)."""
    report = read_report(relevance_dir(settings))
    trained = None if model.kind == "cosine" else report
    digest = hashlib.sha256(json.dumps([trained, ENCODING], sort_keys=True).encode()).hexdigest()[:12]
    return f"{'cosine' if trained is None else model.kind}-{digest}"


def cache_path(settings: Settings, model: RelevanceModel) -> Path:
    return settings.prepared_data_dir / f"relevant-above-{model_identity(settings, model)}.json"


def calibration(settings: Settings, model: RelevanceModel, dataset: Dataset) -> Threshold:
    """The cached calibration of this model on this data set, made (and cached) now when there is none."""
    path = cache_path(settings, model)
    if path.is_file():
        return Threshold(**json.loads(path.read_text()))
    log.info("calibrating the reward's relevance threshold for M1 (%s), once", model.kind)
    threshold = calibrate(model, dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(threshold), indent=2))
    tmp.replace(path)  # atomic: two processes calibrating at once each write a complete file
    log.info(
        "relevance threshold %.3f (balanced accuracy %.3f on %d + %d training labels), cached in %s",
        threshold.value,
        threshold.balanced_accuracy,
        threshold.positives,
        threshold.negatives,
        path,
    )
    return threshold


def relevant_above(settings: Settings, model: RelevanceModel, dataset: Dataset) -> float:
    """``rewards.relevant_above`` when set, else this model's calibrated threshold."""
    if settings.rewards.relevant_above is not None:
        return settings.rewards.relevant_above
    return calibration(settings, model, dataset).value
