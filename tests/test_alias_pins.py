"""An operator's pin on an alias sticks: the store refuses every move (CLI, learner, canary) until unpinned.

SQLite and PostgreSQL (``db_url``), tiny real models as the versions' weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from learner.dpo import DPOLearnerCore
from learner.worker import Learner, LearnerState
from policy_store import AliasPinnedError, PolicyStore, PolicyStoreError
from policy_store.db import downgrade, make_engine, upgrade
from qrloop.models import build_tiny_policy, require_policy
from qrloop.settings import Settings


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tokenizer_dir = require_policy(Settings())
    return [build_tiny_policy(tmp_path_factory.mktemp(f"p{i}"), tokenizer_dir, seed=i) for i in range(3)]


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[PolicyStore]:
    upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as s:
        yield s


def three(store: PolicyStore, weights: list[Path]) -> list[int]:
    v1 = store.publish(weights[0], base_model="tiny").id
    v2 = store.publish(weights[1], base_model="tiny", parent=v1).id
    v3 = store.publish(weights[2], base_model="tiny", parent=v2).id
    return [v1, v2, v3]


def test_a_pinned_alias_refuses_every_move_until_unpinned(store: PolicyStore, weights: list[Path]) -> None:
    v1, v2, v3 = three(store, weights)
    store.set_alias("production", v1)
    store.set_alias("production", v2, actor="learner")
    store.set_alias("canary", v3, actor="learner")
    rolled = store.rollback("production", reason="v2 broke search", actor="oncall", pin=True)
    assert (rolled.from_version, rolled.to_version) == (v2, v1)
    record = store.aliases()["production"]
    assert record.version_id == v1 and record.pinned_by == "oncall" and record.pin_reason == "v2 broke search"
    pin_row = store.history("production")[0]
    assert (pin_row.action, pin_row.actor, pin_row.to_version) == ("pin", "oncall", v1)

    generation = sum(r.generation for r in store.aliases().values())
    refusals = {
        "set_alias": lambda: store.set_alias("production", v3, actor="learner"),
        "rollback": lambda: store.rollback("production"),
        "promote": lambda: store.conclude_canary(v3, "promote", production_version=v1),
    }
    for name, move in refusals.items():
        with pytest.raises(AliasPinnedError, match=r"pinned to version .* by oncall .*unpin production"):
            move()
        assert store.resolve("production").id == v1, name
    assert sum(r.generation for r in store.aliases().values()) == generation, "nothing moved"
    assert [e.action for e in store.audit(limit=2)] == ["pin", "rollback"], "refusals write nothing"
    # The canary alias is not pinned: a verdict that only moves it still goes through.
    store.conclude_canary(v3, "rollback", production_version=v1)
    assert store.resolve("canary").id == v1

    unpinned = store.unpin("production", reason="fixed", actor="oncall")
    assert unpinned.action == "unpin" and unpinned.details["pinned_by"] == "oncall"
    assert store.aliases()["production"].pinned_by is None
    with pytest.raises(PolicyStoreError, match="not pinned"):
        store.unpin("production")
    store.set_alias("production", v2, actor="learner")
    assert store.resolve("production").id == v2
    # Pins are not moves: the holder stack still walks back past them.
    assert store.rollback("production").to_version == v1


def test_the_learner_publishes_but_leaves_a_pinned_alias_alone(
    store: PolicyStore, weights: list[Path], settings: Settings
) -> None:
    v1, v2, v3 = three(store, weights)
    store.set_alias("production", v1)
    store.pin("production", reason="hold", actor="cli")
    no_core = cast(DPOLearnerCore, None)  # moving an alias never reaches the core
    learner = Learner(settings, store, no_core, LearnerState(v1, v1, 0), consumer=None, producer=None)
    assert learner._move_alias(v2) is None, "refused by the store, reported, not raised"
    assert store.resolve("production").id == v1
    store.unpin("production", actor="cli")
    moved = learner._move_alias(v3)
    assert moved is not None and (moved.from_version, moved.to_version) == (v1, v3)


def test_cli_rollback_pin_pin_unpin(
    db_url: str, tmp_path: Path, weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from policy_store.cli import build_app

    app = build_app(lambda: PolicyStore(db_url, tmp_path / "blobs"))
    monkeypatch.setenv("COLUMNS", "200")
    upgrade(db_url)
    runner = CliRunner()
    with PolicyStore(db_url, tmp_path / "blobs") as store:
        v1, v2, _ = three(store, weights)
        store.set_alias("production", v1)
        store.set_alias("production", v2)
        rolled = runner.invoke(app, ["rollback", "production", "--pin", "--reason", "incident"])
        assert rolled.exit_code == 0 and f"{v2} → {v1} (rollback, pinned)" in rolled.stdout, rolled.output
        shown = runner.invoke(app, ["aliases"])
        assert "by cli: incident" in shown.stdout
        refused = runner.invoke(app, ["set-alias", "production", str(v2)])
        assert refused.exit_code == 2 and "is pinned to version" in refused.stderr
        assert runner.invoke(app, ["unpin", "production"]).exit_code == 0
        assert runner.invoke(app, ["set-alias", "production", str(v2)]).exit_code == 0
        pinned = runner.invoke(app, ["pin", "production", "--reason", "freeze"])
        assert pinned.exit_code == 0 and f"pinned to {v2}" in pinned.stdout
        history = runner.invoke(app, ["history", "production"])
        assert "pin" in history.stdout and "unpin" in history.stdout and "freeze" in history.stdout
        assert store.aliases()["production"].pinned_by == "cli"


def test_migration_0003_adds_and_removes_pins(db_url: str, tmp_path: Path, weights: list[Path]) -> None:
    upgrade(db_url, "0002")
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert "pinned_by" not in {c["name"] for c in sa.inspect(conn).get_columns("policy_aliases")}
        upgrade(db_url)
        with PolicyStore(db_url, tmp_path / "blobs") as store:
            v1 = store.publish(weights[0], base_model="tiny").id
            store.set_alias("production", v1)
            store.pin("production", actor="cli")
            assert store.audit(limit=1)[0].action == "pin", "the widened action check accepts 'pin'"
        downgrade(db_url, "0002")
        with engine.connect() as conn:
            assert "pinned_by" not in {c["name"] for c in sa.inspect(conn).get_columns("policy_aliases")}
            actions = conn.execute(sa.text("select action from audit_log order by id")).scalars().all()
            assert actions == ["publish", "set_alias"], "pin rows are removed with the action they use"
        upgrade(db_url)
        with PolicyStore(db_url, tmp_path / "blobs") as store:
            assert store.resolve("production").id == v1 and store.aliases()["production"].pinned_by is None
            store.set_alias("production", v1)
            assert store.audit(limit=1)[0].id > 2, "ids grow past the rows kept"
        if db_url.startswith("sqlite"):  # SQLite's rebuild of audit_log kept AUTOINCREMENT (ids never reused)
            with engine.connect() as conn:
                sql = conn.execute(sa.text("select sql from sqlite_master where name = 'audit_log'")).scalar()
                assert "AUTOINCREMENT" in str(sql) and "'unpin'" in str(sql)
    finally:
        engine.dispose()
