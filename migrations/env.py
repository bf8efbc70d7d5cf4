"""Alembic environment: the policy store's tables and the learner's ledger table, on one metadata.

``policy_store.db`` always sets the URL it is given. Only ``alembic`` run by hand from the repository (no URL
in alembic.ini) falls back to qrloop's settings: this file is an entry point, above every package."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from learner import ledger  # noqa: F401  (registers the learner ledger table)
from policy_store.models import Base
from qrloop.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    explicit = config.get_main_option("sqlalchemy.url")
    return explicit or get_settings().db_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = _url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
