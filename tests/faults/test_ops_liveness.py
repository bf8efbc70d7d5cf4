"""Liveness is the main loop's heartbeat: a role whose loop is stuck (process alive, /healthz thread fine)
fails /healthz, and the supervisor kills and restarts it; a role that keeps beating is left alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from qrloop.cli.supervisor import Backoff, Liveness, Supervised, Supervisor
from qrloop.health import Heartbeat
from qrloop.settings import REPO_ROOT
from tests.helpers import free_port

# A role with the real probe server: its main loop beats for ``beats`` turns, then hangs (a deadlock, a
# blocking call that never returns) while its /healthz thread keeps answering.
ROLE = """
import sys, time
from qrloop import health
port, beats, starts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
open(starts, "a").write("x")
heartbeat = health.Heartbeat(max_age_s=1.0)
health.serve(port, {}, role="test", heartbeat=heartbeat)
for _ in range(beats):
    heartbeat.beat()
    time.sleep(0.1)
time.sleep(3600)  # stuck
"""


def healthz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_heartbeat_ages_and_allows_a_start_grace() -> None:
    now = [0.0]
    heartbeat = Heartbeat(max_age_s=5, start_grace_s=10, clock=lambda: now[0])
    now[0] = 14
    assert heartbeat.alive(), "still loading: max age plus the start grace"
    heartbeat.beat()
    now[0] = 20
    assert not heartbeat.alive(), "after the first beat only the max age counts"


def run_supervised(tmp_path: Path, beats: int, seconds: float) -> tuple[Supervised, int, list[int]]:
    port = free_port()
    starts = tmp_path / f"starts-{beats}"
    role = Supervised("stuck", [], liveness_url=f"http://127.0.0.1:{port}/healthz")

    def spawn(_: Supervised) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", ROLE, str(port), str(beats), str(starts)]
        return subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True)

    supervisor = Supervisor(
        [role],
        spawn,
        Backoff(initial_s=0.2, max_s=1, healthy_after_s=600),
        liveness=Liveness(interval_s=0.5, start_grace_s=5.0, failures=2),
    )
    statuses: list[int] = []
    supervisor.start()
    try:
        deadline = time.monotonic() + seconds
        # Until the restarted process has recorded its start (or the time is up).
        while time.monotonic() < deadline and (starts.read_text() if starts.exists() else "") != "xx":
            supervisor.tick()
            time.sleep(0.1)
        if role.liveness_kills == 0:
            statuses.append(healthz(port)[0])
    finally:
        supervisor.stop(deadline_s=5)
    return role, len(starts.read_text()), statuses


def test_stuck_role_fails_healthz_and_is_restarted(tmp_path: Path) -> None:
    role, starts, _ = run_supervised(tmp_path, beats=5, seconds=90)
    assert role.liveness_kills == 1, "the stuck role was killed"
    assert role.history == [-9], "by SIGKILL, after its /healthz failed twice"
    assert role.restarts == 1 and starts == 2, "and started again"


def test_healthy_role_is_left_alone(tmp_path: Path) -> None:
    role, starts, statuses = run_supervised(tmp_path, beats=10**6, seconds=12)
    assert role.liveness_kills == 0 and role.history == [] and starts == 1
    assert statuses == [200]


def test_stuck_loop_answers_503_with_its_age(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", ROLE, str(port), "3", str(tmp_path / "s")], cwd=REPO_ROOT
    )
    try:
        deadline = time.monotonic() + 60
        status, body = 0, dict[str, object]()
        while time.monotonic() < deadline:
            try:
                status, body = healthz(port)
            except OSError:  # not listening yet
                time.sleep(0.2)
                continue
            if status == 503:
                break
            time.sleep(0.2)
        assert status == 503 and body["ok"] is False, body
        assert float(body["age_s"]) > float(body["max_age_s"])  # type: ignore[arg-type]
        assert process.poll() is None, "the process itself is alive: only the heartbeat tells"
    finally:
        process.kill()
        process.wait()
