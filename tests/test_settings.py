"""One settings object: defaults < TOML file < environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrloop.settings import Settings


def test_defaults_derive_paths_from_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QRLOOP_DATABASE_URL", raising=False)
    settings = Settings(cache_dir=tmp_path)
    assert settings.db_url == f"sqlite:///{tmp_path / 'qrloop.db'}"
    assert settings.blob_dir == tmp_path / "blobs"
    assert settings.kafka.home == tmp_path / "kafka"
    assert settings.dpo.batch_size == 16


def test_file_then_environment_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "qrloop.toml"
    config.write_text(
        'seed = 7\n[dpo]\nbeta = 0.3\nlearning_rate = 1e-5\n[kafka]\nbootstrap_servers = "h:1"\n'
    )
    monkeypatch.setenv("QRLOOP_CONFIG", str(config))
    monkeypatch.setenv("QRLOOP_DPO__BETA", "0.5")
    settings = Settings()
    assert settings.seed == 7
    assert settings.dpo.beta == 0.5, "environment beats the file"
    assert settings.dpo.learning_rate == 1e-5, "file beats the default"
    assert settings.kafka.bootstrap_servers == "h:1"


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QRLOOP_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        Settings()


def test_bad_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRLOOP_DPO__BATCH_SIZE", "sixteen")
    with pytest.raises(ValueError, match="batch_size"):
        Settings()
