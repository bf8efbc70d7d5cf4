"""The operator's summary (``qrloop/status.py``) and ``qrloop status`` on the real broker and both databases:
versions and their lineage, alias moves including a canary rollback, the canary's verdicts (whatever their
names), the learner group's lag, the reward each serving version earned and the dead letters; the text fits
80 columns in a pipe and ``--json`` parses; a broker that does not answer leaves the store's part intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from policy_store import db
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from qrloop.status import gather
from tests.helpers import CONSUMED, PAIRS, SERVED, env_of, isolated, short_run


def test_summary_of_a_short_run(
    settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    run = isolated(settings, unique_topic, settings.db_url, tmp_path / "blobs")
    v = short_run(run, tmp_path)

    with open_store(run) as store:
        summary = gather(store, run)

    assert summary.errors == []
    assert [x.id for x in summary.versions] == [v["v4"], v["v3"], v["v2"], v["v1"]]
    by_id = {x.id: x for x in summary.versions}
    assert by_id[v["v3"]].status == "rejected" and by_id[v["v3"]].parent_id == v["v2"]
    assert by_id[v["v2"]].aliases == ["canary", "production"] and by_id[v["v2"]].loss == 0.69
    assert {a.alias: a.version_id for a in summary.aliases} == {"production": v["v2"], "canary": v["v2"]}
    # The rollback: the canary alias went back from v3 to v2, by the canary job, newest move first.
    newest = summary.alias_moves[0]
    assert (newest.alias, newest.from_version, newest.to_version, newest.actor) == (
        "canary", v["v3"], v["v2"], "canary"
    )  # fmt: skip
    assert len(summary.alias_moves) == 5
    verdicts = [x.get("verdict") for x in summary.canary["verdicts"]]
    assert verdicts == ["inconclusive", "rollback", "continue", "promote"]
    assert summary.canary["production"] == v["v2"] and summary.canary["live"] is False

    assert [(p.topic, p.partition, p.committed, p.end, p.lag) for p in summary.lag] == [
        (run.topics.preference_pairs, 0, CONSUMED, PAIRS, PAIRS - CONSUMED)
    ]
    assert summary.total_lag == PAIRS - CONSUMED
    assert [(r.version, r.queries, round(r.mean_reward, 6)) for r in summary.rewards] == [
        (version, queries, reward) for version, (queries, reward) in SERVED.items()
    ]
    assert summary.dead_letters.total == 3
    assert summary.dead_letters.by_reason == {"malformed_json": 2, "schema_invalid": 1}
    assert summary.dead_letters.latest[0]["offset"] == 2, "newest letter first"
    assert json.loads(json.dumps(summary.as_dict()))["total_lag"] == PAIRS - CONSUMED


def test_broker_down_keeps_the_store_part(settings: Settings, unique_topic: str, tmp_path: Path) -> None:
    run = isolated(settings, unique_topic, settings.db_url, tmp_path / "blobs")
    db.upgrade(run.db_url)
    with open_store(run) as store:
        store.set_alias("production", store.publish(
            build_tiny_policy(tmp_path / "tiny", require_policy(run)), base_model="start").id)  # fmt: skip
    down = run.model_copy(update={"kafka": run.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})})
    with open_store(down) as store:
        summary = gather(store, down)
    assert [x.id for x in summary.versions] == [1]
    assert len(summary.errors) == 1 and "127.0.0.1:1" in summary.errors[0]


def run_cli(args: list[str], settings: Settings, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """``qrloop ARGS`` in a pipe (not a terminal), as a script or CI would run it."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(Path.home()),
        "PYTHONPATH": str(REPO_ROOT),
        "COLUMNS": str(columns),
        "OMP_NUM_THREADS": "1",
        **env_of(settings),
    }
    return subprocess.run(
        [sys.executable, "-m", "qrloop", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def test_status_command_fits_80_columns_and_prints_json(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    run = isolated(base_settings, unique_topic, f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs")
    v = short_run(run, tmp_path)

    text = run_cli(["status"], run)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, text.stdout
    assert len(lines) <= 40, "one screen"
    assert "\x1b[" not in text.stdout, "no colour codes in a pipe"
    assert f"v{v['v4']} ← v{v['v2']}[canary,production] ← v{v['v1']}" in text.stdout
    assert f"v{v['v3']} → v{v['v2']}" in text.stdout and "inconclusive" in text.stdout
    assert "consumer lag: 6 in total" in text.stdout and "dead letters: 3" in text.stdout

    as_json = run_cli(["status", "--json"], run)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert [x["id"] for x in data["versions"]] == [v["v4"], v["v3"], v["v2"], v["v1"]]
    assert data["dead_letters"]["total"] == 3 and data["total_lag"] == 6


def test_policy_tables_fit_80_columns_and_list_as_json(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    run = isolated(base_settings, unique_topic, f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs")
    v = short_run(run, tmp_path)
    # Rich never prints past the width; the point is that nothing is dropped or wrapped: every column's
    # header is there, each version is one row (its id starts exactly one line) with its aliases in full.
    listing = run_cli(["policy", "list"], run).stdout
    assert max(len(line) for line in listing.splitlines()) <= 80, listing
    for header in ("id", "parent", "created", "status", "steps", "digest", "aliases"):
        assert header in listing, listing
    for version in v.values():
        rows = [line for line in listing.splitlines() if line.split()[:1] == [str(version)]]
        assert len(rows) == 1, listing
    v2_row = next(line for line in listing.splitlines() if line.split()[:1] == [str(v["v2"])])
    assert v2_row.rstrip().endswith("canary,production"), listing
    history_text = run_cli(["policy", "history", "canary"], run).stdout
    assert "worse: reward -0.2" in history_text, "the reason keeps its line at 80 columns"

    versions = json.loads(run_cli(["policy", "list", "--json"], run).stdout)
    assert [x["id"] for x in versions] == [v["v4"], v["v3"], v["v2"], v["v1"]]
    assert versions[1]["status"] == "rejected" and versions[2]["aliases"] == ["canary", "production"]
    aliases = json.loads(run_cli(["policy", "aliases", "--json"], run).stdout)
    assert {a["alias"]: a["version_id"] for a in aliases} == {"canary": v["v2"], "production": v["v2"]}
    history = json.loads(run_cli(["policy", "history", "canary", "--json"], run).stdout)
    assert [h["action"] for h in history][:3] == ["canary_verdict", "set_alias", "canary_verdict"]
    assert (history[1]["from_version"], history[1]["to_version"]) == (v["v3"], v["v2"])
    shown = json.loads(run_cli(["policy", "show", str(v["v3"]), "--json"], run).stdout)
    assert shown["lineage"] == [v["v3"], v["v2"], v["v1"]] and shown["status"] == "rejected"
