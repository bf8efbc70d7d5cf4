"""Policy store: schema, publish/load, aliases, rollback, integrity, crash safety, gc, HF load, watcher, CLI.

Every test that touches the database takes ``db_url`` (directly or through ``store``), so it runs on SQLite
and on a fresh real PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from safetensors.torch import load_file, save_file
from sqlalchemy.orm import Session
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer import Typer
from typer.testing import CliRunner

from policy_store import (
    ADAPTER_BASE_TAG,
    BlobIntegrityError,
    BlobMissingError,
    InvalidWeightsError,
    NoPreviousVersionError,
    PolicyStore,
    PolicyStoreError,
    PolicyVersion,
    UnknownAliasError,
    UnknownVersionError,
    UnsafeWeightsError,
    VersionInUseError,
    VersionNotReadyError,
)
from policy_store.cli import build_app
from policy_store.db import downgrade, make_engine, scratch_postgres_database, upgrade
from policy_store.models import Base
from policy_store.retention import RetentionRule

TABLES = {"policy_versions", "policy_aliases", "audit_log", "leases"}


# ------------------------------------------------------------------------------------------------ fixtures


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny Llama checkpoints with different random weights (a stand-in for three DPO steps)."""
    root = tmp_path_factory.mktemp("models")
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        path = root / f"m{seed}"
        LlamaForCausalLM(tiny_config()).save_pretrained(path, safe_serialization=True)
        dirs.append(path)
    return dirs


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[PolicyStore]:
    upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as s:
        yield s


def assert_same_files(expected: Path, actual: Path) -> None:
    """Same file names, same bytes, and the same tensors in every safetensors file."""
    names = sorted(p.relative_to(expected).as_posix() for p in expected.rglob("*") if p.is_file())
    assert sorted(p.relative_to(actual).as_posix() for p in actual.rglob("*") if p.is_file()) == names
    for name in names:
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
        if name.endswith(".safetensors"):
            want, got = load_file(expected / name), load_file(actual / name)
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)  # blobs are stored read-only
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def blob_files(store: PolicyStore) -> list[str]:
    return [digest for digest, _ in store.blobs.iter_blobs()]


# ---------------------------------------------------------------------------------------------------- schema


def test_migrations_upgrade_downgrade_upgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(db_url)
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
            # The hand-written migration and the models describe the same schema (for the store's tables:
            # later migrations by other components add theirs).
            only_ours = {
                "include_name": lambda name, type_, _parent: type_ != "table" or name in TABLES,
                "include_object": lambda _obj, name, type_, _reflected, _other: (
                    type_ != "table" or name in TABLES
                ),
            }
            assert compare_metadata(MigrationContext.configure(conn, opts=only_ours), Base.metadata) == []
        downgrade(db_url, "base")
        with engine.connect() as conn:
            assert not TABLES & set(sa.inspect(conn).get_table_names())
        upgrade(db_url)
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_a_scratch_database_is_dropped_while_a_session_on_it_is_still_open(pg_admin_url: str) -> None:
    """The drop ends the role's own sessions first (a test that forgets to dispose an engine must not leave
    its database behind, nor fail its teardown)."""
    with scratch_postgres_database(pg_admin_url, "qrloop_t") as url:
        left_open = sa.create_engine(url).connect()
        left_open.execute(sa.text("create table t (x int)"))
        left_open.commit()
        name = sa.make_url(url).database
    admin = sa.create_engine(pg_admin_url)
    with admin.connect() as conn:
        remaining = conn.execute(sa.text("select count(*) from pg_database where datname = :n"), {"n": name})
        assert remaining.scalar_one() == 0
    admin.dispose()
    with pytest.raises(sa.exc.OperationalError):  # its session was ended by the drop
        left_open.execute(sa.text("select 1"))


# ---------------------------------------------------------------------------------------- publish and load


def test_publish_get_load_is_bit_identical_with_lineage(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path
) -> None:
    v1 = store.publish(
        model_dirs[0],
        base_model="tiny-llama",
        offsets={"qrloop.preference-pairs:0": 16},
        metrics={"loss": 0.69},
        tags={"run": "a"},
    )
    v2 = store.publish(model_dirs[1], parent=v1, base_model="tiny-llama", train_steps=1)
    v3 = store.publish(model_dirs[2], parent=v2.id, base_model="tiny-llama", train_steps=2)

    assert v1.id < v2.id < v3.id
    assert store.get(v1.id) == v1
    assert v1.offsets == {"qrloop.preference-pairs:0": 16} and v1.metrics == {"loss": 0.69}
    assert v1.tags == {"run": "a"} and v1.kind == "full" and v1.status == "ready"
    assert v1.created_at.tzinfo is not None and v1.created_at.utcoffset() == timedelta(0)
    assert len({v1.blob_digest, v2.blob_digest, v3.blob_digest}) == 3

    assert [v.id for v in store.lineage(v3)] == [v3.id, v2.id, v1.id]
    assert (store.get(v3.id).parent_id, store.get(v2.id).parent_id, v1.parent_id) == (v2.id, v1.id, None)
    assert store.latest() == v3
    assert [v.id for v in store.list()] == [v3.id, v2.id, v1.id]
    assert [e.action for e in store.audit(version=v2)] == ["publish", "publish"]  # its own + v3's parent

    for version, src in zip((v1, v2, v3), model_dirs, strict=True):
        checkout = store.load_dir(version.id)
        assert checkout == store.blob_dir / "checkout" / version.blob_digest
        assert_same_files(src, checkout)
        assert store.load_dir(version) == checkout  # cached, re-verified
        assert_same_files(src, store.load_dir(version, dest=tmp_path / f"copy{version.id}"))


def test_identical_content_is_stored_once(store: PolicyStore, model_dirs: list[Path]) -> None:
    a = store.publish(model_dirs[0], base_model="tiny")
    b = store.publish(model_dirs[0], parent=a, base_model="tiny")
    assert a.id != b.id and a.blob_digest == b.blob_digest
    assert blob_files(store) == [a.blob_digest]


def test_unknown_versions_and_aliases_are_clear_errors(store: PolicyStore, model_dirs: list[Path]) -> None:
    with pytest.raises(UnknownVersionError, match="unknown version 42"):
        store.get(42)
    with pytest.raises(UnknownAliasError, match="unknown alias 'production'"):
        store.resolve("production")
    with pytest.raises(UnknownAliasError):
        store.history("production")
    with pytest.raises(UnknownVersionError, match="unknown parent version 7"):
        store.publish(model_dirs[0], parent=7, base_model="tiny")
    with pytest.raises(UnknownVersionError):
        store.set_alias("production", 7)
    assert store.list() == [] and store.latest() is None
    with pytest.raises(PolicyStoreError, match="topic:partition"):
        store.publish(model_dirs[0], base_model="tiny", offsets={"no-partition": 3})
    with pytest.raises(PolicyStoreError, match="NaN"):
        store.publish(model_dirs[0], base_model="tiny", metrics={"loss": float("nan")})


def test_only_safetensors_directories_are_accepted(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path
) -> None:
    with_bin = tmp_path / "with_bin"
    shutil.copytree(model_dirs[0], with_bin)
    torch.save({"w": torch.zeros(2)}, with_bin / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin"):
        store.publish(with_bin, base_model="tiny")

    disguised = tmp_path / "disguised"  # a pickle without a telling suffix is caught by its magic bytes
    shutil.copytree(model_dirs[0], disguised)
    (disguised / "extra_state").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(UnsafeWeightsError, match="extra_state"):
        store.publish(disguised, base_model="tiny")

    no_config = tmp_path / "no_config"
    shutil.copytree(model_dirs[0], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(InvalidWeightsError, match=r"config\.json"):
        store.publish(no_config, base_model="tiny")
    with pytest.raises(InvalidWeightsError, match=r"adapter_config\.json"):
        store.publish(model_dirs[0], base_model="tiny", kind="lora", tags={ADAPTER_BASE_TAG: 1})

    truncated = tmp_path / "truncated"
    shutil.copytree(model_dirs[0], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidWeightsError, match="truncated"):
        store.publish(truncated, base_model="tiny")

    assert store.list() == [] and blob_files(store) == []


# ------------------------------------------------------------------------------------- aliases and rollback


def test_rollback_restores_previous_weights_and_is_audited(
    store: PolicyStore, model_dirs: list[Path]
) -> None:
    v1 = store.publish(model_dirs[0], base_model="tiny")
    v2 = store.publish(model_dirs[1], parent=v1, base_model="tiny")
    store.set_alias("production", v1, reason="first", actor="learner")
    store.set_alias("production", v2, reason="step 1", actor="learner")
    assert_same_files(model_dirs[1], store.load_dir(store.resolve("production")))

    entry = store.rollback("production", reason="canary failed", actor="canary")
    assert (entry.action, entry.from_version, entry.to_version) == ("rollback", v2.id, v1.id)
    assert store.resolve("production") == v1
    assert_same_files(model_dirs[0], store.load_dir(store.resolve("production")))

    history = store.history("production")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("rollback", v2.id, v1.id),
        ("set_alias", v1.id, v2.id),
        ("set_alias", None, v1.id),
    ]
    assert history[0].actor == "canary" and history[0].reason == "canary failed"
    assert [e.id for e in store.audit(action="rollback")] == [entry.id]

    with pytest.raises(NoPreviousVersionError, match="production"):
        store.rollback("production")  # v1 was the first holder
    with pytest.raises(UnknownAliasError):
        store.rollback("staging")


def test_rollback_walks_back_and_skips_rejected_versions(store: PolicyStore, model_dirs: list[Path]) -> None:
    v1, v2, v3 = (store.publish(d, base_model="tiny") for d in model_dirs)
    for v in (v1, v2, v3):
        store.set_alias("staging", v)
    assert store.rollback("staging").to_version == v2.id
    assert store.rollback("staging").to_version == v1.id  # walks back, does not toggle v2 <-> v3
    with pytest.raises(NoPreviousVersionError):
        store.rollback("staging")
    assert store.rollback("staging", to=v3).to_version == v3.id

    for v in (v1, v2, v3):
        store.set_alias("production", v)
    store.reject(v2, reason="bad canary")
    assert store.rollback("production").to_version == v1.id


def test_reject_refuses_a_held_version_unless_forced(store: PolicyStore, model_dirs: list[Path]) -> None:
    v1 = store.publish(model_dirs[0], base_model="tiny")
    v2 = store.publish(model_dirs[1], parent=v1, base_model="tiny")
    store.set_alias("production", v2)
    with pytest.raises(VersionInUseError, match="production"):
        store.reject(v2, reason="regression")
    assert store.get(v2).status == "ready"

    rejected = store.reject(v2, reason="regression", force=True)
    assert rejected.status == "rejected" and store.latest() == v1
    assert store.latest(status="rejected") == rejected
    reject_row = store.audit(action="reject")[0]
    assert reject_row.to_version == v2.id and reject_row.details["held_by"] == ["production"]
    with pytest.raises(VersionNotReadyError):
        store.set_alias("staging", v2)
    assert store.archive(v1).status == "archived"
    verdict = store.record_canary_verdict(v2, passed=False, details={"ctr_delta": -0.1})
    assert verdict.details == {"passed": False, "ctr_delta": -0.1}


# ------------------------------------------------------------------------------------------------- integrity


def test_tampered_blob_is_refused_naming_the_version(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path
) -> None:
    v1 = store.publish(model_dirs[0], base_model="tiny")
    v2 = store.publish(model_dirs[1], base_model="tiny")
    size = v1.size_bytes
    flip_byte(store.blob_dir / v1.blob_uri, size // 2)  # inside the weights
    flip_byte(store.blob_dir / v2.blob_uri, 0)  # inside the first tar header

    for v in (v1, v2):
        with pytest.raises(BlobIntegrityError, match=f"version {v.id}"):
            store.load_dir(v)
        with pytest.raises(BlobIntegrityError, match=f"version {v.id}"):
            store.verify(v)
        with pytest.raises(BlobIntegrityError, match=f"version {v.id}"):
            store.load_dir(v, dest=tmp_path / f"out{v.id}")
        assert not (tmp_path / f"out{v.id}").exists()
    # Nothing unverified was left where a loader could pick it up.
    assert not (store.blob_dir / "checkout").exists() or not any((store.blob_dir / "checkout").iterdir())


def test_missing_blob_is_refused_naming_the_version(store: PolicyStore, model_dirs: list[Path]) -> None:
    v = store.publish(model_dirs[0], base_model="tiny")
    (store.blob_dir / v.blob_uri).unlink()
    with pytest.raises(BlobMissingError, match=f"version {v.id}"):
        store.load_dir(v.id)
    with pytest.raises(BlobMissingError, match=f"version {v.id}"):
        store.verify(v.id)


def test_modified_checkout_is_never_served(store: PolicyStore, model_dirs: list[Path]) -> None:
    v = store.publish(model_dirs[0], base_model="tiny")
    checkout = store.load_dir(v)
    (checkout / "config.json").write_text("{}")
    (checkout / "stray.txt").write_text("x")
    again = store.load_dir(v)
    assert_same_files(model_dirs[0], again)


def test_a_loader_that_loses_the_extraction_race_serves_the_winners_verified_checkout(
    store: PolicyStore, model_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rewriters on one blob directory: the second looked, found no checkout, and by the time it
    extracts, the first has renamed its own into place. It must verify and use that one (CI once saw a
    rewriter die here with 'not empty')."""
    v = store.publish(model_dirs[0], base_model="tiny")
    materialise = store.blobs.materialise
    calls: list[str] = []

    def other_loader_wins_first(digest: str, dest_dir: Path, *, label: str = "") -> Path:
        calls.append(digest)
        if len(calls) == 1:
            materialise(digest, dest_dir, label=label)  # the other process, between our look and our extract
        return materialise(digest, dest_dir, label=label)

    monkeypatch.setattr(store.blobs, "materialise", other_loader_wins_first)
    assert_same_files(model_dirs[0], store.load_dir(v))
    assert calls == [v.blob_digest]  # the winner's copy was verified and used, not extracted once more


def test_a_given_away_directory_becomes_the_checkout_and_is_never_served_modified(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``publish(give_away=True)``: the learner's saved files are renamed into the checkout, so a server's
    first load verifies them in place (same inode, no extraction); a copy of the same content published
    again, with the checkout there already, is left where it was."""
    mine = shutil.copytree(model_dirs[0], tmp_path / "mine")
    inode = (mine / "model.safetensors").stat().st_ino
    v = store.publish(mine, base_model="tiny", give_away=True)
    assert not mine.exists()

    extracted: list[str] = []
    materialise = store.blobs.materialise

    def counted_materialise(digest: str, dest_dir: Path, *, label: str = "") -> Path:
        extracted.append(digest)
        return materialise(digest, dest_dir, label=label)

    monkeypatch.setattr(store.blobs, "materialise", counted_materialise)
    checkout = store.load_dir(v)
    assert (checkout / "model.safetensors").stat().st_ino == inode and extracted == []
    assert_same_files(model_dirs[0], checkout)
    assert checkout.stat().st_mode & 0o777 == 0o700

    again = shutil.copytree(model_dirs[0], tmp_path / "again")
    store.publish(again, base_model="tiny", give_away=True)
    assert_same_files(model_dirs[0], again)  # the checkout existed: nothing renamed, nothing lost

    (checkout / "config.json").write_text("{}")
    assert_same_files(model_dirs[0], store.load_dir(v))  # a modified adopted checkout is extracted again
    assert extracted == [v.blob_digest]


# ------------------------------------------------------------------------------------------ crash safety, gc


def _offsets_table(db_url: str) -> sa.Table:
    table = sa.Table(
        "learner_offsets",
        sa.MetaData(),
        sa.Column("topic_partition", sa.String(200), primary_key=True),
        sa.Column("next_offset", sa.Integer, nullable=False),
    )
    engine = make_engine(db_url)
    table.create(engine)
    engine.dispose()
    return table


def test_crash_inside_publish_transaction_leaves_no_version_and_gc_removes_the_orphan(
    store: PolicyStore, model_dirs: list[Path], db_url: str
) -> None:
    offsets = _offsets_table(db_url)

    def write_offsets_then_crash(session: Session, _version_id: int) -> None:
        session.execute(sa.insert(offsets).values(topic_partition="pairs:0", next_offset=16))
        raise RuntimeError("learner crashed mid-commit")

    with pytest.raises(RuntimeError, match="mid-commit"):
        store.publish(model_dirs[0], base_model="tiny", extra_sql=write_offsets_then_crash)

    assert store.list() == [] and store.latest() is None and store.audit() == []
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(offsets)).all() == []  # rolled back with the version row
    orphans = blob_files(store)
    assert len(orphans) == 1  # complete but unreferenced; no partial temp files
    assert list(store.blobs.iter_temp()) == []

    assert store.gc(retention=timedelta(hours=1)).removed_blobs == []  # too young to be collected
    report = store.gc(retention=timedelta(0))
    assert report.removed_blobs == orphans and report.freed_bytes > 0
    assert blob_files(store) == []
    assert store.audit(action="gc")[0].details["removed_blobs"] == orphans

    # The same call without the crash commits the version and the offsets together.
    v = store.publish(
        model_dirs[0],
        base_model="tiny",
        offsets={"pairs:0": 16},
        extra_sql=lambda s, _v: s.execute(
            sa.insert(offsets).values(topic_partition="pairs:0", next_offset=16)
        ),
    )
    with engine.connect() as conn:
        assert conn.execute(sa.select(offsets.c.next_offset)).scalar_one() == 16
    engine.dispose()
    assert store.latest() == v and v.offsets == {"pairs:0": 16}


def test_gc_keeps_referenced_blobs(store: PolicyStore, model_dirs: list[Path]) -> None:
    kept = store.publish(model_dirs[0], base_model="tiny")
    store.load_dir(kept)

    def crash(_session: Session, _version_id: int) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        store.publish(model_dirs[1], base_model="tiny", extra_sql=crash)
    orphan = next(d for d in blob_files(store) if d != kept.blob_digest)

    assert store.gc(retention=timedelta(0), dry_run=True).removed_blobs == [orphan]
    assert len(blob_files(store)) == 2  # dry run removed nothing
    report = store.gc(retention=timedelta(0))
    assert report.removed_blobs == [orphan] and report.kept_blobs == 1
    assert blob_files(store) == [kept.blob_digest]
    assert_same_files(model_dirs[0], store.load_dir(kept))


# ---------------------------------------------------------------------------------------- Hugging Face load


def test_published_model_loads_with_auto_model_and_generates(
    store: PolicyStore, model_dirs: list[Path]
) -> None:
    v = store.publish(model_dirs[0], base_model="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(store.load_dir(v)).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    input_ids = torch.tensor([[1, 17, 42, 99]])
    with torch.no_grad():
        out = loaded.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        want = reference.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert torch.equal(out, want)


def test_lora_adapter_publishes_and_loads_with_peft(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base_version = store.publish(model_dirs[0], base_model="tiny")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs[0]), config).eval()
    adapter_dir = tmp_path / "adapter"
    trained.save_pretrained(str(adapter_dir), safe_serialization=True)

    # An adapter means something only over its base: the store refuses one that names none, or a base that
    # is missing, not a whole model, or archived, and writes no version for it.
    refusals: list[tuple[dict[str, object], str]] = [
        ({}, r"needs tags\['base_version'\]"),
        ({ADAPTER_BASE_TAG: "latest"}, r"needs tags\['base_version'\]"),
        ({ADAPTER_BASE_TAG: 99}, "unknown base version 99"),
    ]
    for tags, message in refusals:
        with pytest.raises(PolicyStoreError, match=message):
            store.publish(adapter_dir, base_model="tiny", kind="lora", tags=tags)
    v = store.publish(
        adapter_dir,
        parent=base_version,
        base_model=f"policy:{base_version.id}",
        kind="lora",
        train_steps=1,
        tags={ADAPTER_BASE_TAG: base_version.id},
    )
    assert v.kind == "lora" and v.base_model == f"policy:{base_version.id}"
    with pytest.raises(PolicyStoreError, match=f"base version {v.id} is ready and of kind 'lora'"):
        store.publish(adapter_dir, base_model="tiny", kind="lora", tags={ADAPTER_BASE_TAG: v.id})
    retired = store.publish(model_dirs[1], base_model="tiny")
    store.archive(retired, reason="test")
    with pytest.raises(PolicyStoreError, match=f"base version {retired.id} is archived"):
        store.publish(adapter_dir, base_model="tiny", kind="lora", tags={ADAPTER_BASE_TAG: retired.id})
    assert [x.id for x in store.list()] == [retired.id, v.id, base_version.id], "none for a refused adapter"
    assert_same_files(adapter_dir, store.load_dir(v))

    base = AutoModelForCausalLM.from_pretrained(store.load_dir(base_version))
    served = PeftModel.from_pretrained(base, store.load_dir(v)).eval()
    input_ids = torch.tensor([[1, 5, 9, 33, 64]])
    with torch.no_grad():
        want = trained(input_ids).logits
        got = served(input_ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()(input_ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, plain)  # the adapter really changes the model


def test_a_base_is_not_archived_while_an_adapter_over_it_is_not(
    store: PolicyStore, model_dirs: list[Path], tmp_path: Path
) -> None:
    """Archived weights may be freed by gc, and an adapter cannot load without its base: archiving a base is
    refused while any adapter over it is ready or rejected, and allowed once they are archived (or forced)."""
    base = store.publish(model_dirs[0], base_model="tiny")
    other = store.publish(model_dirs[1], base_model="tiny")
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"r": 4}')
    save_file({"lora_A": torch.zeros(4, 8)}, str(adapter_dir / "adapter_model.safetensors"))

    def adapter_over(version: PolicyVersion) -> PolicyVersion:
        tags = {ADAPTER_BASE_TAG: version.id}
        return store.publish(adapter_dir, parent=version, base_model="tiny", kind="lora", tags=tags)

    ready, rejected, elsewhere = adapter_over(base), adapter_over(base), adapter_over(other)
    store.reject(rejected, reason="test")
    with pytest.raises(VersionInUseError, match=f"base of adapter version\\(s\\) {ready.id}, {rejected.id};"):
        store.archive(base, reason="test")
    assert store.get(base.id).status == "ready"
    store.archive(ready, reason="test")
    with pytest.raises(VersionInUseError, match=f"adapter version\\(s\\) {rejected.id};"):
        store.archive(base, reason="test")
    store.archive(rejected, reason="test")
    assert store.archive(base, reason="test").status == "archived"  # only archived adapters were left
    forced = store.archive(other, reason="test", force=True)
    assert forced.status == "archived" and store.get(elsewhere.id).status == "ready"
    assert store.audit(action="archive", version=other.id)[0].details["adapters"] == [elsewhere.id]

    # Retention archives an unkept base and its unkept adapters in one pass: the adapters first.
    kept = store.publish(model_dirs[2], base_model="tiny")
    old_base = store.publish(model_dirs[0], base_model="tiny")
    old_adapter = adapter_over(old_base)
    newest = store.publish(model_dirs[1], base_model="tiny")
    store.set_alias("production", newest.id)
    rule = RetentionRule(keep_last=1, keep_younger_than=timedelta(0))
    report = store.apply_retention(rule, dry_run=False)
    assert {kept.id, old_base.id, old_adapter.id} <= set(report.archived) and report.skipped == [], report


# -------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PolicyStore, Typer]]:
    """A store, and the ``policy`` commands over it (each opens its own, as the root's factory does)."""
    monkeypatch.setenv("COLUMNS", "200")  # rich would otherwise truncate columns at 80
    upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as s:
        yield s, build_app(lambda: PolicyStore(db_url, tmp_path / "blobs"))


def test_cli_list_set_alias_rollback_and_errors(
    cli_env: tuple[PolicyStore, Typer], model_dirs: list[Path]
) -> None:
    store, app = cli_env
    v1 = store.publish(model_dirs[0], base_model="tiny")
    v2 = store.publish(model_dirs[1], parent=v1, base_model="tiny")
    runner = CliRunner()

    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0, listed.output
    assert v1.blob_digest[:7] in listed.stdout and v2.blob_digest[:7] in listed.stdout
    as_json = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert [(v["id"], v["blob_digest"]) for v in as_json] == [
        (v2.id, v2.blob_digest),
        (v1.id, v1.blob_digest),
    ]

    assert runner.invoke(app, ["set-alias", "production", str(v1.id), "--reason", "init"]).exit_code == 0
    moved = runner.invoke(app, ["set-alias", "production", str(v2.id)])
    assert moved.exit_code == 0 and f"{v1.id} → {v2.id}" in moved.stdout
    assert store.resolve("production") == v2
    assert "production" in runner.invoke(app, ["aliases"]).stdout

    rolled = runner.invoke(app, ["rollback", "production", "--reason", "bad canary"])
    assert rolled.exit_code == 0, rolled.output
    assert store.resolve("production") == v1
    assert store.history("production")[0].reason == "bad canary"
    history = runner.invoke(app, ["history", "production"])
    assert history.exit_code == 0 and "rollback" in history.stdout and "bad canary" in history.stdout
    shown = runner.invoke(app, ["show", "production"])
    assert shown.exit_code == 0 and v1.blob_digest in shown.stdout

    for args, message in [
        (["rollback", "nope"], "unknown alias 'nope'"),
        (["show", "999"], "unknown version 999"),
        (["set-alias", "production", "999"], "unknown version 999"),
        (["rollback", "production"], "no previous ready version"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert store.resolve("production") == v1

    assert runner.invoke(app, ["gc", "--retention-hours", "0"]).exit_code == 0
    assert blob_files(store) == sorted({v1.blob_digest, v2.blob_digest})


def test_created_at_is_utc(store: PolicyStore, model_dirs: list[Path]) -> None:
    v = store.publish(model_dirs[0], base_model="tiny")
    assert store.get(v).created_at.tzinfo == UTC
    assert store.audit()[0].at.tzinfo == UTC
