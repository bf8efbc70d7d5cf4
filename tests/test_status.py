"""The operator's summary (``qrloop/status.py``) and ``qrloop status`` on the real broker and both databases:
versions and their lineage, alias moves including a canary rollback, the canary's verdicts (whatever their
names), the learner group's lag, the reward each serving version earned and the dead letters; the text fits
80 columns in a pipe and ``--json`` parses; a broker that does not answer leaves the store's part intact."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from policy_store import PolicyStore
from qrloop import db
from qrloop.events import DeadLetter, QueryOutcome, encode, utcnow
from qrloop.models import build_tiny_policy, require_policy
from qrloop.settings import REPO_ROOT, Settings
from qrloop.status import gather
from qrloop.topics import ensure_topics

# Version → (queries served, reward of each): what the outcome topic says each version earned.
SERVED = {1: (6, 0.20), 2: (5, 0.30), 3: (4, 0.10)}
DEAD = ["malformed_json", "malformed_json", "schema_invalid"]
PAIRS, CONSUMED = 10, 4


def isolated(base: Settings, name: str, db_url: str, blob_dir: Path) -> Settings:
    """``base`` with its own topics, Faust app id, learner name, store and blob directory."""
    topics = base.topics.model_copy(
        update={
            "query_events": f"{name}.query-events",
            "interactions": f"{name}.interactions",
            "preference_pairs": f"{name}.preference-pairs",
            "policy_versions": f"{name}.policy-versions",
            "dead_letter": f"{name}.dead-letter",
            "query_outcomes": f"{name}.query-outcomes",
        }
    )
    return base.model_copy(
        update={
            "topics": topics,
            "streams": base.streams.model_copy(update={"app_id": f"{name}-agg"}),
            "dpo": base.dpo.model_copy(update={"learner_name": name}),
            "database_url": db_url,
            "blob_dir": blob_dir,
        }
    )


def env_of(settings: Settings) -> dict[str, str]:
    """The environment that makes a ``qrloop`` subprocess see ``settings``'s store and topics."""
    t = settings.topics
    return {
        "QRLOOP_DATABASE_URL": settings.db_url,
        "QRLOOP_BLOB_DIR": str(settings.blob_dir),
        "QRLOOP_TOPICS__QUERY_EVENTS": t.query_events,
        "QRLOOP_TOPICS__INTERACTIONS": t.interactions,
        "QRLOOP_TOPICS__PREFERENCE_PAIRS": t.preference_pairs,
        "QRLOOP_TOPICS__POLICY_VERSIONS": t.policy_versions,
        "QRLOOP_TOPICS__DEAD_LETTER": t.dead_letter,
        "QRLOOP_TOPICS__QUERY_OUTCOMES": t.query_outcomes,
        "QRLOOP_STREAMS__APP_ID": settings.streams.app_id,
        "QRLOOP_DPO__LEARNER_NAME": settings.dpo.learner_name,
        "QRLOOP_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
    }


def outcome(n: int, version: int, reward: float) -> QueryOutcome:
    arm = "canary" if version == 3 else "production"
    return QueryOutcome(
        query_event_id=f"q-{version}-{n}",
        event_time=utcnow() - timedelta(seconds=100 - n),
        policy_version=version,
        arm=arm,
        reward=reward,
        relevance=0.6,
        rewards=[reward, reward],
        logprobs=[-5.0, -6.0],
        tie=False,
    )


def short_run(settings: Settings, tmp_path: Path) -> dict[str, int]:
    """What a short run leaves behind, written through the same APIs the loop's roles use.

    v1 starts production; the learner publishes v2 (canary), the canary promotes it; v3 becomes the canary,
    is analysed once (inconclusive), then rolled back (canary → v2, v3 rejected); the learner goes on from
    v2 with v4, which the canary judges with an outcome name this code has never seen. Then the outcome,
    dead-letter and pair topics get their records, and the learner's group commits 4 of the 10 pairs.
    """
    ensure_topics(settings)
    db.upgrade(settings.db_url)
    weights = build_tiny_policy(tmp_path / "tiny", require_policy(settings))
    tags = {"learner": settings.dpo.learner_name}
    with PolicyStore.from_settings(settings) as store:
        v1 = store.publish(weights, base_model="start", actor="demo").id
        store.set_alias("production", v1, reason="start", actor="demo")
        v2 = store.publish(weights, parent=v1, base_model="start", train_steps=1, tags=tags,
                           metrics={"loss": 0.69, "margin": 0.01}).id  # fmt: skip
        store.set_alias("canary", v2, reason="DPO step 1", actor="learner")
        store.conclude_canary(
            v2, "promote", production_version=v1, reason="better", details={"p_value": 0.01}
        )
        v3 = store.publish(weights, parent=v2, base_model="start", train_steps=2, tags=tags,
                           metrics={"loss": 0.65, "margin": 0.05}).id  # fmt: skip
        store.set_alias("canary", v3, reason="DPO step 2", actor="learner")
        store.record_canary_verdict(
            v3, passed=False, alias="canary", details={"verdict": "continue", "n_canary": 12, "share": 0.1}
        )
        store.conclude_canary(v3, "rollback", production_version=v2, reason="worse: reward -0.2",
                              details={"p_value": 0.002, "n_production": 30, "n_canary": 31,
                                       "mean_production": 0.3, "mean_canary": 0.1})  # fmt: skip
        v4 = store.publish(weights, parent=v2, base_model="start", train_steps=3, tags=tags,
                           metrics={"loss": 0.6, "margin": 0.1}).id  # fmt: skip
        store.record_canary_verdict(v4, passed=False, alias="canary", details={"verdict": "inconclusive"})
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for version, (queries, reward) in SERVED.items():
        for n in range(queries):
            producer.send(settings.topics.query_outcomes, encode(outcome(n, version, reward)))
    for n, reason in enumerate(DEAD):
        letter = DeadLetter.of(settings.topics.interactions, 0, n, reason, f"bad record {n}", b"{oops")
        producer.send(settings.topics.dead_letter, encode(letter))
    for _ in range(PAIRS):
        producer.send(settings.topics.preference_pairs, key=b"k", value=b"{}", partition=0)
    producer.flush()
    producer.close()
    pairs = TopicPartition(settings.topics.preference_pairs, 0)
    group = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"{settings.dpo.learner_name}-learner",
        enable_auto_commit=False,
    )
    group.commit({pairs: OffsetAndMetadata(CONSUMED, "", -1)})
    group.close()
    return {"v1": v1, "v2": v2, "v3": v3, "v4": v4}


def test_summary_of_a_short_run(settings: Settings, own_topics: str, tmp_path: Path) -> None:
    run = isolated(settings, own_topics, settings.db_url, tmp_path / "blobs")
    v = short_run(run, tmp_path)

    with PolicyStore.from_settings(run) as store:
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
    with PolicyStore.from_settings(run) as store:
        store.set_alias("production", store.publish(
            build_tiny_policy(tmp_path / "tiny", require_policy(run)), base_model="start").id)  # fmt: skip
    down = run.model_copy(update={"kafka": run.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})})
    with PolicyStore.from_settings(down) as store:
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
    base_settings: Settings, own_topics: str, tmp_path: Path
) -> None:
    run = isolated(base_settings, own_topics, f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs")
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
    base_settings: Settings, own_topics: str, tmp_path: Path
) -> None:
    run = isolated(base_settings, own_topics, f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs")
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
