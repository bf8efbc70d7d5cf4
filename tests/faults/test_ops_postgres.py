"""Local security of scripts/postgres.sh on PRIVATE clusters (own port, own data directory, own secret files;
the shared cluster on 5432 is never touched): scram-sha-256 with a generated 0600 password, never 'trust',
and an old 'trust' cluster migrated in place, idempotently."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from qrloop.settings import REPO_ROOT, with_stored_password
from tests.helpers import free_port

SCRIPT = REPO_ROOT / "scripts" / "postgres.sh"
# What an older scripts/postgres.sh did: initdb with trust, a role whose password is 'qrloop'.
OLD_TRUST_INIT = """
set -e
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir -p "$DATA"; [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$(dirname "$DATA")"
as_owner "$bin/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
as_owner "$bin/pg_ctl" -D "$DATA" -l "$DATA/../old.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA" start >/dev/null
psql() { as_owner "$bin/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -qc "$1"; }
psql "create role qrloop login createdb password 'qrloop'"
psql "create database qrloop owner qrloop"
"""


class Cluster:
    def __init__(self) -> None:
        # Not pytest's tmp_path: the cluster's owner ('postgres' when run as root) must reach the directory.
        self.root = Path(tempfile.mkdtemp(prefix="qrloop-ops-pg-"))
        self.config = Path(tempfile.mkdtemp(prefix="qrloop-ops-pg-config-"))
        self.port = free_port()
        self.data = self.root / "data"
        self.env = dict(
            os.environ,
            QRLOOP_PG_PORT=str(self.port),
            QRLOOP_PG_DATA=str(self.data),
            XDG_CONFIG_HOME=str(self.config),
        )
        assert self.port != 5432

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    @property
    def secret(self) -> Path:
        return self.config / "qrloop" / "postgres-password"

    def url(self, password: str | None = None) -> str:
        base = f"postgresql+psycopg://qrloop@127.0.0.1:{self.port}/qrloop"
        if password is None:
            return with_stored_password(base, self.secret)
        return base.replace("qrloop@", f"qrloop:{password}@")


def connects(url: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select 1")).scalar() == 1
    except OperationalError as exc:
        assert "password authentication failed" in str(exc) or "no password supplied" in str(exc), exc
        return False
    finally:
        engine.dispose()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.script("stop")
    shutil.rmtree(c.root, ignore_errors=True)
    shutil.rmtree(c.config, ignore_errors=True)


def assert_private(c: Cluster) -> None:
    for path, mode in (
        (c.secret, 0o600),
        (c.secret.parent / "postgres-admin-password", 0o600),
        (c.secret.parent, 0o700),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    hba = (c.data / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), rules


def test_fresh_cluster_uses_scram_and_a_generated_password(cluster: Cluster) -> None:
    started = cluster.script("start")
    assert started.returncode == 0, started.stderr
    secret = cluster.secret.read_text().strip()
    assert len(secret) >= 32
    url = started.stdout.strip().splitlines()[-1]
    assert url == f"postgresql+psycopg://qrloop@127.0.0.1:{cluster.port}/qrloop", "no password in the URL"
    assert secret not in started.stdout + started.stderr, "the password is never printed"
    assert_private(cluster)
    assert connects(cluster.url()), "the generated password works (filled in as the settings do)"
    assert not connects(cluster.url("qrloop")), "the old hard-coded password does not"
    assert not connects(cluster.url("")), "nor no password at all"


def test_trust_cluster_is_migrated_in_place_idempotently(cluster: Cluster) -> None:
    old = subprocess.run(
        ["bash", "-c", OLD_TRUST_INIT],
        env=dict(cluster.env, DATA=str(cluster.data), PORT=str(cluster.port)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert old.returncode == 0, old.stderr
    assert connects(cluster.url("anything")), "trust: any password (or none) gets in"

    migrated = cluster.script("start")
    assert migrated.returncode == 0, migrated.stderr
    assert "switching it to scram-sha-256" in migrated.stderr
    assert "trust" in (cluster.data / "pg_hba.conf.trust-backup").read_text()
    assert_private(cluster)
    assert connects(cluster.url()) and not connects(cluster.url("qrloop")) and not connects(cluster.url("x"))

    secret = cluster.secret.read_text()
    again = cluster.script("start")
    assert again.returncode == 0 and "switching" not in again.stderr, again.stderr
    assert cluster.secret.read_text() == secret, "a second run keeps the password"
    assert connects(cluster.url())
