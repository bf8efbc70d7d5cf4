"""Database plumbing of the policy store: engines and Alembic migrations, for a URL the caller gives.

Like MLflow's ``SqlAlchemyStore(db_uri)``, nothing here reads the application's settings: the composition
root passes the URL in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text

from policy_store.blobs import private_file

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "migrations"


def make_engine(url: str) -> Engine:
    """An engine with the per-backend settings the policy store relies on."""
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and db_path != ":memory:":
            # 0600 in a 0700 directory: the database holds the audit log and what the learner trained on.
            # SQLite gives its -wal and -shm files the database file's mode.
            private_file(Path(db_path))
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers (rewriter, canary) poll while the learner writes; foreign keys are off by
            # default in SQLite and the lineage relies on them.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")  # first, so the WAL switch below waits for locks
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    ini = REPO_ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation character; passwords may contain it.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    if url.startswith("sqlite"):
        # Connect once so the pragmas run: the file is created in WAL mode before any second process opens it
        # (switching a busy database to WAL fails at once instead of waiting).
        engine = make_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


@contextmanager
def scratch_postgres_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of ``server_url`` (whose role may create databases),
    dropped on exit; yields its URL. For tests and benchmarks."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'create database "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            _drop_postgres_database(conn, name)
        admin.dispose()


def _drop_postgres_database(conn: Connection, name: str) -> None:
    """Drop ``name`` even while this role still has sessions open on it.

    Not ``drop database ... with (force)``: that refuses when one of the sessions is an autovacuum worker
    (its role is none, so a role that is neither superuser nor in pg_signal_backend may not end it). This
    ends the role's own sessions, waiting up to 5 s for each, and leaves autovacuum to plain ``drop
    database``, which stops its workers itself."""
    conn.execute(
        text(
            "select pg_terminate_backend(pid, 5000) from pg_stat_activity"
            " where datname = :name and usename = current_user and pid <> pg_backend_pid()"
        ),
        {"name": name},
    )
    conn.execute(text(f'drop database if exists "{name}"'))
