"""M1 as a small head on frozen MiniLM embeddings: trained on training-split labels, scored deterministically,
never used on a data set it was not trained on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from learner.offline.relevance_head import fit_head, outdated, train_relevance_head, with_random_negatives
from qrloop.cli.doctor import check_relevance_model
from qrloop.relevance import HEAD_COMMAND, HEAD_KIND, REPORT, Pairs, RelevanceModel, pair_features
from qrloop.settings import Settings


def with_m1_dir(settings: Settings, folder: Path) -> Settings:
    return settings.model_copy(
        update={"models": settings.models.model_copy(update={"relevance_dir": folder})}
    )


def test_pair_features_are_u_v_product_difference_and_cosine() -> None:
    u = np.array([1.0, 0.0])
    v = np.array([[0.6, 0.8], [0.0, 1.0]])
    f = pair_features(u, v)
    assert f.shape == (2, 2 * 4 + 1)
    assert f[0].tolist() == pytest.approx([1, 0, 0.6, 0.8, 0.6, 0, 0.4, 0.8, 0.6])
    assert f[1, -1] == 0.0, "orthogonal: cosine 0"


def test_fit_head_learns_a_known_relevance_from_features() -> None:
    # Relevance is a hidden linear function of the cosine (last feature) and one coordinate, plus noise; the
    # head must rank held-out rows by it far better than chance, and stay within [0, 1].
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 9))
    target = np.clip(0.5 + 0.2 * x[:, -1] - 0.1 * x[:, 0] + rng.normal(0, 0.02, 600), 0, 1)
    head = fit_head(x[:400], target[:400], l2=1.0)
    predicted = np.array([head.predict_row(row) for row in x[400:]])
    assert np.all((predicted >= 0) & (predicted <= 1))
    assert spearmanr(predicted, target[400:]).statistic > 0.95
    shrunk = fit_head(x[:400], target[:400], l2=1e9)
    assert np.allclose(shrunk.weight, 0, atol=1e-4), "a huge penalty leaves only the mean"
    assert shrunk.predict_row(x[400]) == pytest.approx(target[:400].mean(), abs=1e-3)


def test_random_negatives_pair_training_queries_with_catalog_products_at_relevance_zero() -> None:
    labelled = Pairs(
        ["drill", "saw"], ["cordless drill", "hand saw"], np.array([1.0, 0.67], dtype=np.float32)
    )
    catalog = [f"product {i}" for i in range(50)]
    pairs = with_random_negatives(labelled, catalog, 20, seed=3)
    assert len(pairs) == 22 and pairs.queries[:2] == labelled.queries and pairs.texts[:2] == labelled.texts
    assert pairs.targets.tolist() == pytest.approx([1.0, 0.67] + [0.0] * 20)
    assert set(pairs.queries[2:]) <= {"drill", "saw"} and set(pairs.texts[2:]) <= set(catalog)
    assert len(set(pairs.texts[2:])) > 10, "spread over the catalog, not one product"
    assert with_random_negatives(labelled, catalog, 20, seed=3).texts == pairs.texts  # seeded
    assert with_random_negatives(labelled, catalog, 0, seed=3) is labelled


def test_set_up_retrains_only_a_head_trained_without_random_negatives() -> None:
    assert outdated({"kind": HEAD_KIND, "dataset": "homedepot"})
    assert not outdated({"kind": HEAD_KIND, "dataset": "homedepot", "random_negatives": 2000})
    assert not outdated({"kind": "bi-encoder", "dataset": "homedepot"}), "a fine-tuned M1 is left alone"


def test_a_trained_head_loads_scores_deterministically_and_passes_the_doctor(
    base_settings: Settings, tmp_path: Path
) -> None:
    settings = with_m1_dir(base_settings, tmp_path / "m1")
    report = train_relevance_head(
        settings, max_pairs=300, negatives=100, l2=100.0, heldout_max_queries=3, baseline=False
    )
    assert report["kind"] == HEAD_KIND and report["train_pairs"] == 300 and report["random_negatives"] == 100
    assert set(report["heldout_scores"]) == {"labelled_mean", "random_product_mean"}
    assert not outdated(report)
    assert report["dataset"] == "homedepot" and report["heldout"]["queries"] == 3
    assert not (tmp_path / "m1.tmp").exists(), "the finished head replaced its temporary directory"
    assert check_relevance_model(settings).ok
    model = RelevanceModel.load(settings)
    assert model.kind == HEAD_KIND
    texts = ["Simpson Strong-Tie 12-Gauge Angle Galvanized Steel", "garden hose 50 ft", "angle bracket"]
    together = model.score("angle bracket", texts)
    assert together.shape == (3,) and np.all((together >= 0) & (together <= 1))
    # A product's score must not depend on what was scored before it (replays must be bit-identical).
    fresh = RelevanceModel.load(settings)
    one_by_one = [float(fresh.score("angle bracket", [t])[0]) for t in reversed(texts)][::-1]
    assert together.tolist() == one_by_one


def test_m1_trained_on_another_data_set_is_not_used(
    base_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "m1"
    folder.mkdir()
    (folder / REPORT).write_text(json.dumps({"kind": HEAD_KIND, "dataset": "crowdflower"}))
    settings = with_m1_dir(base_settings, folder)
    with caplog.at_level(logging.WARNING, logger="qrloop.relevance"):
        model = RelevanceModel.load(settings)
    assert model.kind == "cosine"
    assert "trained on 'crowdflower' labels" in caplog.text and HEAD_COMMAND in caplog.text
    check = check_relevance_model(settings)
    assert not check.ok and "crowdflower" in check.detail and check.fix == HEAD_COMMAND
