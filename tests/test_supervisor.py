"""The supervisor restarts crashed roles with exponential backoff and stops every role on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qrloop.cli.supervisor import Backoff, Spawner, Supervised, Supervisor


def python_spawner(scripts: dict[str, str]) -> Spawner:
    def spawn(role: Supervised) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", scripts[role.name]], start_new_session=True)

    return spawn


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(initial_s=1, factor=2, max_s=10)
    assert [backoff.delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 10]


def test_crashing_role_is_restarted_with_backoff(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    crash_script = f"open({str(counter)!r}, 'a').write('x'); raise SystemExit(3)"
    steady_script = "import time; time.sleep(60)"
    supervisor = Supervisor(
        [Supervised("crashy", []), Supervised("steady", [])],
        python_spawner({"crashy": crash_script, "steady": steady_script}),
        Backoff(initial_s=0.2, factor=2, max_s=1, healthy_after_s=60),
    )
    supervisor.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(counter.read_text() if counter.exists() else "") < 3:
        supervisor.tick()
        time.sleep(0.05)
    crashy, steady = supervisor.roles
    assert len(counter.read_text()) >= 3, "the crashing role was restarted"
    assert crashy.history[:2] == [3, 3]
    assert crashy.failures >= 2 and crashy.restarts >= 2
    assert steady.restarts == 0 and steady.process is not None and steady.process.poll() is None
    supervisor.stop(deadline_s=5)
    assert steady.process.poll() is not None, "stop() ends the healthy role too"


def test_stop_kills_a_role_that_ignores_sigterm() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = Supervisor([Supervised("stubborn", [])], python_spawner({"stubborn": stubborn}))
    supervisor.start()
    time.sleep(0.5)  # let it install its handler
    started = time.monotonic()
    supervisor.stop(deadline_s=1)
    assert supervisor.roles[0].process is not None and supervisor.roles[0].process.poll() is not None
    assert time.monotonic() - started < 5


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_roles_get_sigterm_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """Roles run in their own sessions; without a parent-death signal a SIGKILLed daemon orphans them."""
    pid_file, stopped = tmp_path / "role.pid", tmp_path / "role.stopped"
    role = (
        "import os, signal, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"def stop(*_): open({str(stopped)!r}, 'w').write('TERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(120)\n"
    )
    daemon_code = (
        "import sys\n"
        "from qrloop.cli.supervisor import Supervised, Supervisor, spawn_command\n"
        f"Supervisor([Supervised('role', [])], spawn_command([sys.executable, '-c', {role!r}])).run()\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", daemon_code], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and daemon.poll() is None, "the role never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert running(child)
        daemon.kill()
        daemon.wait()
        deadline = time.monotonic() + 5
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child), "the role outlived its SIGKILLed supervisor"
        assert stopped.read_text() == "TERM", "it was stopped by SIGTERM, so it could stop cleanly"
    finally:
        if pid_file.exists() and pid_file.read_text() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
