"""Several rewriters: two `qrloop serve` processes on the same store and announcements serve the same
versions, and a shopper's canary arm does not depend on which of them answers (stable hash routing)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from qrloop.events import PolicyAnnouncement, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from tests.helpers import free_port, get, isolated_env, store_settings, wait_for

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

SHOPPERS = [f"shopper-{i}" for i in range(24)]


def rewrite(port: int, shopper: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rewrite",
        data=json.dumps({"query": "cordless drill", "shopper_id": shopper, "session_id": "s"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        event: dict[str, Any] = json.loads(response.read())
    return event


def served(port: int) -> dict[str, tuple[str, int]]:
    """Each shopper's (arm, version) as this rewriter serves them now."""
    events = {shopper: rewrite(port, shopper) for shopper in SHOPPERS}
    return {shopper: (e["arm"], e["policy_version"]) for shopper, e in events.items()}


def test_two_rewriters_follow_the_same_announcements_and_route_shoppers_alike(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    tokenizer = require_policy(base_settings)
    dirs = [build_tiny_policy(tmp_path / f"tiny{seed}", tokenizer, seed=seed) for seed in range(3)]
    settings = store_settings(base_settings, unique_topic, tmp_path, dirs[0])  # version 1 in production
    with open_store(settings) as store:
        canary = store.publish(dirs[1], base_model="tiny", actor="test")
        store.set_alias("canary", canary.id, reason="candidate", actor="test")
    env = isolated_env(settings, unique_topic) | {
        "QRLOOP_CANARY__ENABLED": "true",
        "QRLOOP_CANARY__SHARE_STEPS": "[0.5]",
        "QRLOOP_REWRITER__MAX_NEW_TOKENS": "4",
    }
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve-{port}.log" for port in ports]
    servers = []
    for port, log_path in zip(ports, logs, strict=True):
        with log_path.open("wb") as sink:
            servers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "qrloop", "serve", "--port", str(port)],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for port, log_path in zip(ports, logs, strict=True):

            def ready(p: int = port) -> bool:
                return get(f"http://127.0.0.1:{p}/readyz")[0] == 200

            wait_for(ready, 180, "/readyz", log_path)

        # The arm is a hash of the shopper (salted by the canary version), not of the process: each shopper
        # gets the same arm and version from either rewriter, and the share splits them.
        first, second = served(ports[0]), served(ports[1])
        assert first == second
        assert {arm for arm, _ in first.values()} == {"production", "canary"}
        assert {v for arm, v in first.values() if arm == "canary"} == {canary.id}

        # The learner's path: publish, move the alias, announce. Both rewriters follow the one topic (each
        # reads it whole, no consumer group), and both switch production to the new version.
        with open_store(settings) as store:
            newer = store.publish(dirs[2], base_model="tiny", actor="test")
            store.set_alias("production", newer.id, reason="step", actor="test")
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        note = PolicyAnnouncement(
            kind="alias_moved", version=newer.id, alias="production", previous_version=1
        )
        producer.send(settings.topics.policy_versions, key=str(newer.id).encode(), value=encode(note))
        producer.flush()
        producer.close()
        line = f"production arm now serves version {newer.id}"
        for log_path in logs:

            def logged(p: Path = log_path) -> bool:
                return line in p.read_text(errors="replace")

            wait_for(logged, 120, line, log_path)
        first, second = served(ports[0]), served(ports[1])
        assert first == second
        assert {v for arm, v in first.values() if arm == "production"} == {newer.id}
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
