"""A bad qrloop.toml or environment is refused with the key's name; on SIGHUP the old settings stay."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from qrloop.reload import reload_settings
from qrloop.settings import Settings, mask_secrets


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qrloop.toml"
    path.write_text("")
    monkeypatch.setenv("QRLOOP_CONFIG", str(path))
    return path


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'databse_url = "postgresql+psycopg://x@h/db"\n',
            "unknown setting 'databse_url' (did you mean 'database_url'?)",
        ),
        (
            "[dpo]\npublish_evry = 2\n",
            "unknown setting 'dpo.publish_evry' (did you mean 'dpo.publish_every'?)",
        ),
        ("[dpoo]\nbeta = 0.2\n", "unknown setting 'dpoo' (did you mean 'dpo'?)"),
        ("[dpo]\npublish_every = 0\n", "publish_every"),
        ("[rewriter]\ntemperature = 0\n", "temperature"),
        ("[rewriter]\ntop_p = 1.5\n", "top_p"),
        ("[dpo]\nbatch_size = 0\n", "batch_size"),
        ("[dpo]\nbeta = -1\n", "beta"),
        ("[streams]\ntick_s = 0\n", "tick_s"),
        ("[topics]\npartitions = 0\n", "partitions"),
        ("[topics]\ndead_letter = 'has space'\n", "dead_letter"),
        ("[dpo]\nalias = '1bad alias'\n", "alias"),
        ("[canary]\nalpha = 1.5\n", "alpha"),
        ("[logging]\nlevel = 'LOUD'\n", "logging.level"),
        ("[daemon]\nroles = ['serve', 'lurn']\n", "lurn"),
        ("[daemon]\nlearn_port = 9101\n", "ports must differ"),
        ("[daemon]\nserve_port = 70000\n", "serve_port"),
        ("[retention]\nkeep_last = 0\n", "keep_last"),
        ("[rewriter]\nmax_in_flight = 0\n", "max_in_flight"),
    ],
)
def test_bad_file_is_refused_with_the_keys_name(config: Path, toml: str, message: str) -> None:
    config.write_text(toml)
    with pytest.raises(ValueError, match=None) as caught:
        Settings()
    assert message in str(caught.value), str(caught.value)


def test_unknown_environment_variable_is_refused(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRLOOP_DATABSE_URL", "postgresql+psycopg://x@h/db")
    with pytest.raises(
        ValueError, match=r"QRLOOP_DATABSE_URL names no setting \(did you mean 'QRLOOP_DATABASE_URL'\?\)"
    ):
        Settings()
    monkeypatch.delenv("QRLOOP_DATABSE_URL")
    monkeypatch.setenv("QRLOOP_DPO__BETTA", "0.2")
    with pytest.raises(ValueError, match="QRLOOP_DPO__BETA"):
        Settings()
    monkeypatch.delenv("QRLOOP_DPO__BETTA")
    assert Settings().dpo.beta == 0.1, "a valid environment still works"


def _reloads(role: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("qrloop_settings_reloads_total", {"role": role, "outcome": outcome})
    return value or 0.0


@pytest.mark.parametrize(
    "bad",
    [
        "[dpo]\npublish_every = 0\n",
        "databse_url = 'sqlite:///x'\n",
        "[dpo\nbroken toml",
        None,  # the file vanished
    ],
)
def test_failed_reload_keeps_the_old_settings_and_is_counted(config: Path, bad: str | None) -> None:
    config.write_text("[dpo]\npublish_every = 3\n")
    current = Settings()
    applied: list[Settings] = []
    if bad is None:
        config.unlink()
    else:
        config.write_text(bad)
    failed_before = _reloads("test-role", "failed")
    assert reload_settings("test-role", applied.append) is False
    assert applied == [] and current.dpo.publish_every == 3
    assert _reloads("test-role", "failed") == failed_before + 1

    config.write_text("[dpo]\npublish_every = 4\n")
    assert reload_settings("test-role", applied.append) is True
    assert [s.dpo.publish_every for s in applied] == [4]


def test_secrets_are_masked_in_config_show_and_repr(config: Path, tmp_path: Path) -> None:
    config.write_text('database_url = "postgresql+psycopg://qrloop:s3cret-pw@127.0.0.1:5432/qrloop"\n')
    settings = Settings()
    assert "s3cret-pw" in settings.db_url, "the processes themselves still get the real URL"
    assert "s3cret-pw" not in str(settings.describe())
    assert "s3cret-pw" not in repr(settings)
    assert mask_secrets("x postgresql://u:p@h/d y") == "x postgresql://u:***@h/d y"


def test_password_comes_from_the_0600_secret_file(config: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("generated-pw\n")
    secret.chmod(0o600)
    config.write_text(
        'database_url = "postgresql+psycopg://qrloop@127.0.0.1:5432/qrloop"\n'
        f'database_password_file = "{secret}"\n'
    )
    assert Settings().db_url == "postgresql+psycopg://qrloop:generated-pw@127.0.0.1:5432/qrloop"
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        Settings()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_mask_passwords(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from qrloop import logs

    logs.configure("INFO", fmt)
    try:
        log = logging.getLogger("qrloop.test")
        log.info("connecting to %s", "postgresql+psycopg://qrloop:hunter2@127.0.0.1/qrloop")
        try:
            raise ConnectionError("postgresql://qrloop:hunter2@db/qrloop refused")
        except ConnectionError:
            log.exception("failed")
    finally:
        logs.configure("WARNING", "text")
    err = capsys.readouterr().err
    assert "hunter2" not in err and err.count("qrloop:***@") == 3, err
