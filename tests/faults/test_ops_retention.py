"""Bounded disk: the retention policy archives old versions and frees their weights, keeping what may still be
loaded (aliases, rollback targets, references, learners' latest, the last N, the young); a killed learner's
temporary save directory is removed at the next start. Real SQLite and PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from learner.worker import remove_stale_saves, save_prefix
from policy_store import PolicyStore, db
from policy_store.entities import PolicyVersion
from policy_store.errors import BlobMissingError
from policy_store.models import SqlPolicyVersion
from policy_store.retention import RetentionRule, plan_retention
from qrloop.runs import open_store
from qrloop.settings import Settings

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def version(vid: int, parent: int | None, age_h: float, kind: str = "full", **tags: object) -> PolicyVersion:
    return PolicyVersion(
        id=vid,
        parent_id=parent,
        created_at=NOW - timedelta(hours=age_h),
        base_model="tiny",
        train_steps=vid,
        blob_digest=f"{vid:064x}",
        blob_uri="",
        size_bytes=1,
        kind=kind,  # type: ignore[arg-type]
        status="ready",
        tags=dict(tags),
    )


def test_the_rule_keeps_what_may_still_be_loaded_and_says_why() -> None:
    # 1 is the offline reference; 2..9 a linear online run from it; 10 the young head of a second learner.
    versions = [version(1, None, 500)]
    versions += [version(v, v - 1, 400 - v, learner="a", reference_version=1) for v in range(2, 10)]
    versions += [version(10, 1, 1, learner="b", reference_version=1)]
    plan = plan_retention(
        versions,
        aliases={"production": 5, "canary": 6, "pinned-good": 3},
        previous_holders={"production": 4, "canary": None, "pinned-good": None},
        now=NOW,
        rule=RetentionRule(keep_last=2, keep_younger_than=timedelta(hours=24)),
    )
    assert plan.keep == {
        1: ["reference"],
        3: ["alias:pinned-good"],
        4: ["rollback:production"],
        5: ["alias:production"],
        6: ["alias:canary"],
        9: ["last", "learner:a"],
        10: ["last", "learner:b", "young"],
    }
    assert plan.archive == [2, 7, 8], "old, unaliased intermediate versions lose their weights"


def test_a_kept_adapter_keeps_the_version_it_applies_to() -> None:
    # 2 is a full version nothing else keeps (neither an alias, a reference nor a root); 3 and 4 are LoRA
    # adapters over it in a lineage rooted at 1 (its reference). Only the adapters' own tag names 2.
    versions = [version(1, None, 500), version(2, None, 450)]
    versions += [
        version(v, v - 1 if v > 3 else 1, 400 - v, kind="lora", base_version=2, reference_version=1)
        for v in (3, 4)
    ]
    versions += [version(5, None, 300)]
    plan = plan_retention(
        versions,
        aliases={"production": 4},
        previous_holders={"production": None},
        now=NOW,
        rule=RetentionRule(keep_last=1, keep_younger_than=timedelta(0)),
    )
    assert plan.keep[2] == ["base"], plan.keep
    assert 3 not in plan.keep and plan.archive == [3], "an adapter nothing keeps goes like any version"


def weights_dir(root: Path, seed: int) -> Path:
    path = root / f"w{seed}"
    path.mkdir()
    torch.manual_seed(seed)
    save_file({"w": torch.randn(64, 64)}, str(path / "model.safetensors"))  # 16 KiB each
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[PolicyStore]:
    db.upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as s:
        yield s


def age(store: PolicyStore, vid: int, hours: float) -> None:
    with store._writing() as session:
        session.execute(
            sa.update(SqlPolicyVersion)
            .where(SqlPolicyVersion.id == vid)
            .values(created_at=datetime.now(UTC) - timedelta(hours=hours))
        )


def blob_bytes(store: PolicyStore) -> int:
    return sum(p.stat().st_size for p in store.blob_dir.rglob("*") if p.is_file())


def test_retention_archives_and_frees_weights_on_the_real_database(
    store: PolicyStore, tmp_path: Path
) -> None:
    ids = []
    parent = None
    for seed in range(8):
        v = store.publish(
            weights_dir(tmp_path, seed), parent=parent, base_model="tiny", tags={"learner": "a"}
        )
        ids.append(v.id)
        parent = v.id
        age(store, v.id, 100 - seed)
    store.set_alias("production", ids[2])
    store.set_alias("production", ids[4])  # rollback target: ids[2]
    for vid in ids[:5]:
        store.load_dir(vid)  # checkouts too (as big as the blob each)
    before = blob_bytes(store)

    report = store.apply_retention(
        RetentionRule(keep_last=2, keep_younger_than=timedelta(hours=1)), blob_grace=timedelta(0)
    )

    kept = {ids[0], ids[2], ids[4], ids[6], ids[7]}  # reference (root), rollback target, alias, last two
    assert set(report.plan.keep) == kept and report.archived == [ids[1], ids[3], ids[5]]
    assert {v.id for v in store.list(status="archived")} == {ids[1], ids[3], ids[5]}
    for vid in kept:
        assert store.load_dir(vid).is_dir(), "kept versions still load"
    for vid in report.archived:
        with pytest.raises(BlobMissingError):
            store.verify(vid)
    assert store.lineage(ids[7])[-1].id == ids[0], "rows stay: the lineage is intact"
    assert store.rollback("production").to_version == ids[2], "the rollback target kept its weights"
    assert blob_bytes(store) < before and report.gc.freed_bytes > 0
    assert [e.to_version for e in store.audit(action="archive")] == sorted(report.archived, reverse=True)
    # A second pass: the version production was rolled back from has lost its alias, so it goes now.
    again = store.apply_retention(
        RetentionRule(keep_last=2, keep_younger_than=timedelta(hours=1)), blob_grace=timedelta(0)
    )
    assert again.archived == [ids[4]] and len(again.gc.removed_blobs) == 1


def test_cli_gc_retention_dry_run_then_apply(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qrloop.cli.main import policy_app as app
    from qrloop.settings import get_settings

    db.upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as store:
        ids = [store.publish(weights_dir(tmp_path, s), base_model="tiny").id for s in range(4)]
        for vid in ids:
            age(store, vid, 48)
        store.set_alias("production", ids[-1])
    monkeypatch.setenv("QRLOOP_DATABASE_URL", db_url)
    monkeypatch.setenv("QRLOOP_BLOB_DIR", str(tmp_path / "blobs"))
    monkeypatch.setenv("QRLOOP_RETENTION__KEEP_LAST", "1")
    monkeypatch.setenv("QRLOOP_RETENTION__BLOB_GRACE_H", "0")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        dry = runner.invoke(app, ["gc", "--retention", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        assert "to archive" in dry.output
        applied = runner.invoke(app, ["gc", "--retention"])
        assert applied.exit_code == 0, applied.output
        assert applied.output.count("archived") >= 3, applied.output
    finally:
        get_settings.cache_clear()
    with PolicyStore(db_url, tmp_path / "blobs") as store:
        assert {v.id for v in store.list(status="archived")} == set(ids[:-1])


def test_learner_start_removes_its_stale_save_directories(base_settings: Settings, tmp_path: Path) -> None:
    settings = base_settings.model_copy(update={"cache_dir": tmp_path})
    stale = tmp_path / f"{save_prefix(settings)}abc123"
    (stale / "nested").mkdir(parents=True)
    (stale / "nested" / "model.safetensors").write_bytes(b"x" * 1024)
    other = tmp_path / "qrloop-save-another-learner-xyz"  # another learner's: not ours to remove
    other.mkdir()
    assert remove_stale_saves(settings) == [stale]
    assert not stale.exists() and other.exists()


def test_sqlite_file_is_0600_and_blob_dirs_0700_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'cache' / 'qrloop.db'}"
        db.upgrade(url)
        with PolicyStore(url, tmp_path / "cache" / "blobs") as store:
            v = store.publish(weights_dir(tmp_path, 0), base_model="tiny")
            checkout = store.load_dir(v)
    finally:
        os.umask(old)
    assert mode(tmp_path / "cache") == 0o700
    assert mode(tmp_path / "cache" / "qrloop.db") == 0o600
    assert (
        mode(tmp_path / "cache" / "blobs") == 0o700 and mode(tmp_path / "cache" / "blobs" / "sha256") == 0o700
    )
    assert mode(checkout.parent) == 0o700
    assert "secret" not in repr(PolicyStore("postgresql+psycopg://u:secret@127.0.0.1:1/x", tmp_path / "b"))


def test_the_daemon_applies_retention_periodically(settings: Settings, tmp_path: Path) -> None:
    import threading
    import time

    from qrloop.cli.daemon import start_retention

    db.upgrade(settings.db_url)
    with open_store(settings) as store:
        ids = [store.publish(weights_dir(tmp_path, s), base_model="tiny").id for s in range(3)]
        for vid in ids:
            age(store, vid, 48)
        store.set_alias("production", ids[0])
    settings = settings.model_copy(
        update={
            "retention": settings.retention.model_copy(
                update={"keep_last": 1, "interval_s": 0.2, "blob_grace_h": 0.0}
            )
        }
    )
    stopping = threading.Event()
    thread = start_retention(settings, stopping)
    assert thread is not None
    try:
        with open_store(settings) as store:
            deadline = time.monotonic() + 120
            while not store.list(status="archived") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert [v.id for v in store.list(status="archived")] == [ids[1]], "aliased and newest kept"
            assert [e.actor for e in store.audit(action="archive")] == ["daemon"]
    finally:
        stopping.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    disabled = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"enabled": False})}
    )
    assert start_retention(disabled, threading.Event()) is None
