"""The long-running daemon on the real broker and database: ``qrloop run`` starts the roles, each answers
/readyz and its /metrics move as traffic flows, a crashed role is restarted, SIGTERM stops everything with
exit 0; the learner's SIGTERM mid-step abandons (or finishes) the step with nothing half-published and the
next start resumes exactly where it left off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from learner.worker import LEARNER_TAG
from policy_store import PolicyVersion
from qrloop.events import encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from tests.helpers import (
    free_port,
    get,
    isolated_env,
    ledger_counts,
    metric,
    pair,
    serve_and_click,
    store_settings,
    wait_for,
)

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def test_run_roles_ready_metrics_move_crash_restart_and_stop(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings))
    settings = store_settings(base_settings, unique_topic, tmp_path, tiny)
    ports = {"serve": free_port(), "aggregate": free_port(), "learn": free_port()}
    env = isolated_env(settings, unique_topic) | {
        "QRLOOP_DAEMON__SERVE_PORT": str(ports["serve"]),
        "QRLOOP_DAEMON__AGGREGATE_PORT": str(ports["aggregate"]),
        "QRLOOP_DAEMON__LEARN_PORT": str(ports["learn"]),
        "QRLOOP_DAEMON__BACKOFF_INITIAL_S": "0.5",
    }
    log_path = tmp_path / "daemon.log"
    sink = log_path.open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "run", "--roles", "serve,aggregate,learn", "--log-format", "json"],
        cwd=REPO_ROOT,
        env=env,
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for role, port in ports.items():

            def ready(p: int = port) -> bool:
                return get(f"http://127.0.0.1:{p}/readyz")[0] == 200

            wait_for(ready, 180, f"{role} /readyz", log_path)
        _, body = get(f"http://127.0.0.1:{ports['learn']}/readyz")
        checks = json.loads(body)["checks"]
        assert set(checks) == {"broker", "database", "model"} and all(c["ok"] for c in checks.values())
        # Readiness covers the aggregator's agents and the rewriter's follower; liveness is a heartbeat.
        aggregator = json.loads(get(f"http://127.0.0.1:{ports['aggregate']}/readyz")[1])["checks"]
        assert aggregator["agents"]["ok"] and "agents running" in aggregator["agents"]["detail"], aggregator
        rewriter = json.loads(get(f"http://127.0.0.1:{ports['serve']}/readyz")[1])["checks"]
        assert rewriter["follower"]["ok"], rewriter
        for port in ports.values():
            alive = json.loads(get(f"http://127.0.0.1:{port}/healthz")[1])
            assert alive["ok"] and alive["age_s"] <= alive["max_age_s"], alive
        assert metric(ports["aggregate"], "qrloop_pairs_emitted_total") == 0
        assert metric(ports["learn"], "qrloop_dpo_steps_total") == 0

        # Traffic: queries through the rewriter, then each shopper clicks a different number of products
        # on the two lists (margin 0: every query whose lists differ is a pair).
        serve_and_click(ports["serve"], settings.topics.interactions, kafka_bootstrap)
        assert metric(ports["serve"], "qrloop_queries_served_total") == 16
        wait_for(
            lambda: metric(ports["aggregate"], "qrloop_pairs_emitted_total") >= 4, 120, "pairs", log_path
        )
        wait_for(lambda: metric(ports["learn"], "qrloop_dpo_steps_total") >= 1, 120, "a DPO step", log_path)
        assert metric(ports["aggregate"], "qrloop_windows_closed_total") >= 4
        wait_for(lambda: metric(ports["learn"], "qrloop_alias_version") >= 2, 60, "a published version")

        # A crashed role is restarted with backoff, and the daemon says so.
        old_pid = json.loads(get(f"http://127.0.0.1:{ports['learn']}/healthz")[1])["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            status, _ = get(f"http://127.0.0.1:{ports['learn']}/readyz")
            return (
                status == 200
                and json.loads(get(f"http://127.0.0.1:{ports['learn']}/healthz")[1])["pid"] != old_pid
            )

        wait_for(restarted, 120, "the learner's restart", log_path)
        assert "learn exited with code -9; restarting in" in log_path.read_text()

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=90) == 0, "the daemon stops cleanly on SIGTERM, its roles with it"
    finally:
        # Roles run in their own sessions: a failed test stops them through the daemon, as an operator would.
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
        sink.close()
    for port in ports.values():
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 0, "every role stopped with the daemon"
    records = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    learner_lines = [r for r in records if r.get("logger") == "qrloop.learner"]
    assert any(r["message"].startswith("DPO step 1:") for r in learner_lines), "JSON logs from the learner"
    assert {"time", "level", "logger", "message", "pid"} <= set(learner_lines[0])


def test_learner_sigterm_mid_step_commits_nothing_half_done_and_resumes(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    """The real SmolLM2 (a step takes seconds on CPU), so SIGTERM lands inside a step."""
    settings = store_settings(base_settings, unique_topic, tmp_path, require_policy(base_settings))
    pairs = [pair(n) for n in range(12)]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for p in pairs:
        producer.send(settings.topics.preference_pairs, key=p.pair_id.encode(), value=encode(p))
    producer.flush()
    producer.close()
    log_path = tmp_path / "learner.log"
    config = tmp_path / "qrloop.toml"
    config.write_text("[dpo]\nbeta = 0.1\n")

    started: list[subprocess.Popen[bytes]] = []

    def start(deadline_s: float) -> subprocess.Popen[bytes]:
        env = isolated_env(settings, unique_topic) | {
            "QRLOOP_DPO__STOP_DEADLINE_S": str(deadline_s),
            "QRLOOP_CONFIG": str(config),
            # Adam's state would make each of the real policy's versions 1.6 GB, and their checkouts as
            # much again (10.9 GB at this test's peak); nothing checked here depends on it, and
            # tests/faults/test_learner_faults.py checks that a resumed optimizer ends bit-identical.
            "QRLOOP_DPO__KEEP_OPTIMIZER_STATE": "false",
            # The whole step in the step call, seconds long, so that SIGTERM lands inside it: gradient
            # batching would have run most of it as the pairs arrived (tests/test_dpo.py checks that).
            "QRLOOP_DPO__GRADIENT_BATCHING": "false",
        }
        with log_path.open("ab") as sink:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "qrloop", "learn"],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=sink,
                    stderr=sink,
                )
            )
        return started[-1]

    def lines() -> str:
        return log_path.read_text(errors="replace")

    def mine() -> list[PolicyVersion]:
        with open_store(settings) as store:
            return sorted(
                (v for v in store.list() if v.tags.get(LEARNER_TAG) == unique_topic), key=lambda v: v.id
            )

    try:
        # 1. A deadline far shorter than a step: SIGTERM inside step 1 abandons it; nothing is published.
        learner = start(deadline_s=0.2)
        wait_for(lambda: "DPO step 1 started" in lines(), 240, "step 1 to start", log_path)
        learner.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert learner.wait(timeout=30) == 0
        assert time.monotonic() - sent < 10
        assert "abandoning the step in progress" in lines()
        assert "DPO step 1:" not in lines(), "the step was abandoned, not finished"
        assert mine() == [] and ledger_counts(settings) == {}

        # 2. A generous deadline: SIGTERM inside the (redone) step 1 lets it finish and publish, then exit 0.
        learner = start(deadline_s=120)
        wait_for(lambda: lines().count("DPO step 1 started") == 2, 240, "step 1 to start again", log_path)
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(timeout=120) == 0
        versions = mine()
        assert [v.train_steps for v in versions] == [1], lines()[-3000:]
        assert sum(versions[0].offsets.values()) == 4, "four pairs consumed, over the pair partitions"
        first = set(ledger_counts(settings))  # whichever four the partitions' interleaving delivered first
        assert len(first) == 4 and first <= {p.pair_id for p in pairs}

        # 3. The next start resumes at offset 4 and trains the rest, each pair exactly once. SIGHUP reloads
        # the DPO temperature from the edited config file.
        learner = start(deadline_s=120)
        wait_for(lambda: len(mine()) == 3, 240, "steps 2 and 3", log_path)
        config.write_text("[dpo]\nbeta = 0.3\n")
        learner.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "settings reloaded: log level INFO, {'beta': 0.3}" in lines(), 30, "the reload", log_path
        )
        assert learner.poll() is None, "SIGHUP does not stop the learner"
        learner.send_signal(signal.SIGTERM)
        assert learner.wait(timeout=120) == 0
        versions = mine()
        assert [v.train_steps for v in versions] == [1, 2, 3]
        assert [v.parent_id for v in versions[1:]] == [v.id for v in versions[:-1]]
        counts = ledger_counts(settings)
        assert set(counts) == {p.pair_id for p in pairs} and set(counts.values()) == {1}
        assert f"learner resuming at version {versions[0].id} (reference 1, step 1)" in lines()
    finally:
        for process in started:  # a failed phase leaves no learner behind
            if process.poll() is None:
                process.kill()
                process.wait()
