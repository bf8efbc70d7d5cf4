"""`qrloop doctor` tells a working setup from a broken one, and names the command that fixes each problem."""

from __future__ import annotations

from pathlib import Path

from policy_store import db
from qrloop.cli.doctor import run_checks
from qrloop.settings import KafkaSettings, Settings


def test_doctor_passes_on_the_real_setup(
    base_settings: Settings, kafka_bootstrap: str, sqlite_url: str
) -> None:
    db.upgrade(sqlite_url)
    results = {r.name: r for r in run_checks(base_settings.model_copy(update={"database_url": sqlite_url}))}
    models = ("policy model", "relevance encoder", "relevance model M1", "catalog embeddings")
    for name in ("kafka", "database", *models, "data"):
        assert results[name].ok, f"{name}: {results[name].detail}"


def test_doctor_names_the_fix_for_each_broken_part(base_settings: Settings, tmp_path: Path) -> None:
    broken = base_settings.model_copy(
        update={
            "kafka": KafkaSettings(bootstrap_servers="127.0.0.1:1", home=tmp_path / "kafka"),
            "database_url": f"sqlite:///{tmp_path / 'empty.db'}",
            "data_dir": tmp_path / "no-data",
            "cache_dir": tmp_path,
        },
        deep=True,  # the nested model settings below are changed in place
    )
    broken.models.policy_dir = tmp_path / "no-policy"
    broken.models.relevance_dir = tmp_path / "no-m1"
    results = {r.name: r for r in run_checks(broken)}
    assert not results["kafka"].ok and "scripts/kafka.sh" in results["kafka"].fix
    assert not results["database"].ok and results["database"].fix == "qrloop db upgrade"
    assert not results["policy model"].ok and results["policy model"].fix == "qrloop models prepare"
    assert not results["relevance model M1"].ok and "train-relevance" in results["relevance model M1"].fix
    assert not results["data"].ok and "QRLOOP_DATA_DIR" in results["data"].fix
