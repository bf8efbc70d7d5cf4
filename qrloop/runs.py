"""Where a run's state lives: the policy store the settings name, and isolated runs.

An *isolated run* (the demo, a benchmark, a test) shares nothing with any other: every topic of
``TopicSettings`` (all of them, so a topic added later is isolated too) gets the run's suffix, the policy
store is a SQLite file with its blobs in the run's directory, and the consumer groups (the Faust application
id, the learner's group) carry the run's name. :func:`run_env` turns such settings into the ``QRLOOP_*``
environment that makes a child process (``qrloop serve``, ``aggregate``, ``learn``, ``canary run``) read the
same run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policy_store import PolicyStore
from policy_store.db import upgrade
from qrloop.settings import Settings, TopicSettings


def open_store(settings: Settings) -> PolicyStore:
    """The policy store the settings name (its database URL and blob directory)."""
    assert settings.blob_dir is not None  # filled in by the settings validator
    return PolicyStore(settings.db_url, settings.blob_dir)


def open_migrated_store(settings: Settings) -> PolicyStore:
    """:func:`open_store` after bringing the schema up to date (Alembic ``upgrade head``: a no-op when
    current), for commands a person runs against a database that may be new."""
    upgrade(settings.db_url)
    return open_store(settings)


def topic_fields() -> list[str]:
    """The names of ``TopicSettings``' topic-name fields (the string ones; the others are counts)."""
    return [name for name, field in TopicSettings.model_fields.items() if field.annotation in (str, "str")]


def isolate(
    base: Settings,
    name: str,
    run_dir: Path | None,
    *,
    topic_suffix: str | None = None,
    learner_name: str | None = None,
) -> Settings:
    """``base`` with its own topics (``<topic><topic_suffix>``, default ``.<name>``), store
    (``<run_dir>/qrloop.db``, blobs in ``<run_dir>/blobs``; ``run_dir`` None keeps ``base``'s store) and
    consumer groups (Faust app ``<app_id>-<name>``, learner ``learner_name`` or ``<name>``)."""
    suffix = f".{name}" if topic_suffix is None else topic_suffix
    topics = {field: getattr(base.topics, field) + suffix for field in topic_fields()}
    update: dict[str, Any] = {
        "topics": base.topics.model_copy(update=topics),
        "streams": base.streams.model_copy(update={"app_id": f"{base.streams.app_id}-{name}"}),
        "dpo": base.dpo.model_copy(update={"learner_name": learner_name or name}),
    }
    if run_dir is not None:
        # Weights of a run live with the run: a version is a 540 MB blob, and deleting the run's directory
        # must free them. A blob directory shared between stores would also let one store's `policy gc`
        # delete blobs that only another store references.
        update |= {"database_url": f"sqlite:///{run_dir / 'qrloop.db'}", "blob_dir": run_dir / "blobs"}
    return base.model_copy(update=update)


def run_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus the ``QRLOOP_*`` variables that point a child
    process at the run ``settings`` describe: store, blobs, every topic and partition count, groups."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "QRLOOP_DATABASE_URL": settings.db_url,
            "QRLOOP_BLOB_DIR": str(settings.blob_dir),
            **{f"QRLOOP_TOPICS__{f.upper()}": getattr(settings.topics, f) for f in topic_fields()},
            "QRLOOP_TOPICS__PARTITIONS": str(settings.topics.partitions),
            "QRLOOP_TOPICS__PAIR_PARTITIONS": str(settings.topics.pair_partitions),
            "QRLOOP_STREAMS__APP_ID": settings.streams.app_id,
            "QRLOOP_DPO__LEARNER_NAME": settings.dpo.learner_name,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
