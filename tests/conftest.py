"""Shared fixtures. Services are real: the Kafka broker and PostgreSQL started by scripts/*.sh.

A missing service is a test *failure* with the command that starts it, never a skip: a green run must mean
the real parts were exercised.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from sqlalchemy import create_engine, text

from policy_store.db import scratch_postgres_database
from qrloop.settings import Settings, default_password_file, mask_secrets, with_stored_password
from tests.helpers import ISSUED_TOPIC_NAMES, unique_topic_name

# scripts/postgres.sh keeps the qrloop role's generated password in a 0600 file; the URL never holds it.
PG_ADMIN_URL = os.environ.get("QRLOOP_TEST_PG_URL") or with_stored_password(
    "postgresql+psycopg://qrloop@127.0.0.1:5432/qrloop_test", default_password_file()
)


# Measured in a full run: the real-model tests raise the disk's use by up to 4.6 GB at once (tmp_path dirs
# of passed tests are removed as they pass, see pyproject.toml). A full disk shows as dozens of unrelated
# errors, so the free space is printed at the end of every run (and in the header without -q).
DISK_NEEDED_GB = 8.0


def free_disk_lines() -> list[str]:
    lines = []
    for name, path in (("tmp_path", Path(tempfile.gettempdir())), ("cache", Settings().cache_dir)):
        path.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(path).free / 1e9
        low = f" (under the {DISK_NEEDED_GB:.0f} GB the suite needs)" if free_gb < DISK_NEEDED_GB else ""
        lines.append(f"free disk for {name} ({path}): {free_gb:.1f} GB{low}")
    return lines


def pytest_report_header(config: pytest.Config) -> list[str]:
    return free_disk_lines()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ISSUED_TOPIC_NAMES:
        bootstrap = Settings().kafka.bootstrap_servers
        terminalreporter.write_line(delete_session_topics(bootstrap, ISSUED_TOPIC_NAMES))
    for line in free_disk_lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings as a user would have them (real cache with prepared models and data)."""
    return Settings()


@pytest.fixture(scope="session")
def kafka_bootstrap(base_settings: Settings) -> str:
    servers = base_settings.kafka.bootstrap_servers
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=5000)
        admin.describe_cluster()
        admin.close()
    except (KafkaError, OSError) as exc:
        pytest.fail(f"Kafka broker not reachable at {servers} ({exc}). Start it with: scripts/kafka.sh start")
    return servers


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:
        shown = mask_secrets(PG_ADMIN_URL)
        pytest.fail(f"PostgreSQL not reachable at {shown} ({exc}). Start it with: scripts/postgres.sh start")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with scratch_postgres_database(pg_admin_url, "qrloop_t") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'qrloop.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'qrloop.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(base_settings: Settings, db_url: str, tmp_path: Path) -> Settings:
    """Real cache (models, data), private database and blob directory."""
    return base_settings.model_copy(update={"database_url": db_url, "blob_dir": tmp_path / "blobs"})


@pytest.fixture
def unique_topic() -> str:
    return unique_topic_name()


def delete_session_topics(bootstrap: str, issued: set[str]) -> str:
    """Delete the topics whose names contain one of ``issued``; say how many, or why none.

    Why: a reused machine keeps the broker's data between runs, and a full run leaves about 900 partitions
    behind. Loading them made the broker's start exceed its deadline on a CI machine after a few runs.
    """
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    except (KafkaError, OSError) as exc:
        return f"test topics not deleted: broker unreachable ({exc})"
    try:
        ours = [topic for topic in admin.list_topics() if any(name in topic for name in issued)]
        if ours:  # one request: the broker takes a run's ~470 names at once
            admin.delete_topics(ours, timeout_ms=30000)
        return f"deleted the {len(ours)} topics this session's tests created"
    except KafkaError as exc:
        return f"test topics not all deleted ({exc})"
    finally:
        admin.close()
