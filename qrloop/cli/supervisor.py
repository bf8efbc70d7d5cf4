"""``qrloop run``: the configured roles as supervised child processes, restarted with backoff when they crash.

Each role is also its own command (``qrloop serve``, ``aggregate``, ``learn``, ``canary``) for deployments
that run them as separate services; the supervisor is for a single host. A role that exits non-zero is
restarted after an exponential backoff (1 s, 2 s, 4 s, ... capped), and the supervisor says so; a role that
stayed up for ``healthy_after_s`` resets its backoff. SIGTERM/SIGINT stop every role (SIGTERM, then SIGKILL
after the deadline) and the supervisor exits 0; SIGHUP is passed on to every role (the daemon first checks
that the new settings validate).

The one way qrloop runs child processes: the daemon (``run()``), and the demo and the benchmarks, which start
their roles with ``with Supervisor(...)`` and watch them without restarting (they never call ``tick()``).

Liveness: a role that is running but stuck (its main loop no longer beats, so its ``/healthz`` answers 503,
or does not answer at all) is as dead as one that exited. With a :class:`Liveness`, the supervisor probes
each role's ``/healthz`` every ``interval_s`` (after ``start_grace_s``: models take a while to load) and,
after ``failures`` consecutive failed probes, SIGKILLs the role's process group; the usual exit handling then
restarts it with backoff. SIGKILL, not SIGTERM: a stuck loop would not act on SIGTERM either, and every role
is crash-safe (the learner commits weights and offsets in one transaction).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrloop.settings import REPO_ROOT

log = logging.getLogger("qrloop.supervisor")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    healthy_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based)."""
        return min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1))


@dataclass
class Supervised:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)  # exit codes
    liveness_url: str | None = None  # its /healthz; None: only its exit is watched
    failed_probes: int = 0
    next_probe_at: float = 0.0
    liveness_kills: int = 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


Spawner = Callable[[Supervised], subprocess.Popen[bytes]]
Probe = Callable[[str], bool]


def http_probe(timeout_s: float = 5.0) -> Probe:
    """A probe that passes when ``url`` answers 200 within ``timeout_s``."""

    def probe(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):  # 503, refused, timed out: all mean "not alive"
            return False

    return probe


@dataclass(frozen=True)
class Liveness:
    interval_s: float = 10.0
    start_grace_s: float = 300.0
    failures: int = 2  # consecutive failed probes before a kill: one slow answer is not a wedged role
    probe: Probe = field(default_factory=http_probe)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies; None off Linux.

    Each role runs in its own session (so a Ctrl-C in the daemon's terminal reaches the daemon only, which
    then stops the roles in order); but then a SIGKILLed daemon would leave its roles running, orphaned, still
    holding their ports and consumer groups. SIGTERM lets each role stop as it does under the supervisor.
    The death signal follows the *thread* that forked, which is the supervisor's main loop.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # resolved here: the child should do as little as possible
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal will never come
            os._exit(0)

    return preexec


def spawn_command(
    command: Sequence[str], env: Mapping[str, str] | None = None, log_dir: Path | None = None
) -> Spawner:
    """Each role is ``command`` + its argv, in its own session, sent SIGTERM if the supervisor dies; with
    ``log_dir`` its output goes to ``<log_dir>/<role name>.log`` (appended to across restarts)."""
    preexec = die_with_parent()

    def spawn(role: Supervised) -> subprocess.Popen[bytes]:
        output = None if log_dir is None else (log_dir / f"{role.name}.log").open("ab")
        try:
            return subprocess.Popen(
                [*command, *role.argv],
                cwd=REPO_ROOT,
                env=dict(env or os.environ),
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor

    return spawn


def spawn_qrloop(env: Mapping[str, str] | None = None, log_dir: Path | None = None) -> Spawner:
    return spawn_command([sys.executable, "-m", "qrloop"], env, log_dir)


class Supervisor:
    def __init__(
        self,
        roles: Sequence[Supervised],
        spawn: Spawner,
        backoff: Backoff = Backoff(),
        stop_deadline_s: float = 30.0,
        liveness: Liveness | None = None,
    ) -> None:
        self.roles = list(roles)
        self.spawn = spawn
        self.backoff = backoff
        self.stop_deadline_s = stop_deadline_s
        self.liveness = liveness
        self.stopping = threading.Event()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for role in self.roles:
            self._launch(role)

    def _launch(self, role: Supervised) -> None:
        role.process = self.spawn(role)
        role.started_at = time.monotonic()
        role.restart_at = None
        role.failed_probes = 0
        role.next_probe_at = role.started_at + (self.liveness.start_grace_s if self.liveness else 0.0)
        log.info("started %s (pid %d)", role.name, role.process.pid)

    def tick(self, now: float | None = None) -> None:
        """One supervision pass: notice exits, schedule and perform restarts."""
        now = time.monotonic() if now is None else now
        for role in self.roles:
            self._check_liveness(role, now)
            process = role.process
            if process is not None and process.poll() is not None:
                code = process.returncode
                role.history.append(code)
                role.process = None
                if now - role.started_at >= self.backoff.healthy_after_s:
                    role.failures = 0  # it had been healthy: this is a fresh failure, not a crash loop
                role.failures += 1
                delay = self.backoff.delay(role.failures)
                role.restart_at = now + delay
                log.warning(
                    "%s exited with code %d; restarting in %.0f s (failure %d)",
                    role.name,
                    code,
                    delay,
                    role.failures,
                )
            if (
                role.process is None
                and role.restart_at is not None
                and now >= role.restart_at
                and not self.stopping.is_set()
            ):
                role.restarts += 1
                self._launch(role)

    def _check_liveness(self, role: Supervised, now: float) -> None:
        """Probe a running role's /healthz when due; kill it after ``failures`` failed probes in a row."""
        live = self.liveness
        process = role.process
        if live is None or role.liveness_url is None or process is None or process.poll() is not None:
            return
        if now < role.next_probe_at:
            return
        role.next_probe_at = now + live.interval_s
        if live.probe(role.liveness_url):
            role.failed_probes = 0
            return
        role.failed_probes += 1
        log.warning("%s failed its liveness probe (%d in a row)", role.name, role.failed_probes)
        if role.failed_probes >= live.failures:
            log.error("%s is stuck (%s not live); killing it to restart it", role.name, role.liveness_url)
            role.liveness_kills += 1
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self, deadline_s: float | None = None) -> None:
        """SIGTERM to every role; SIGKILL to the process group of any still running after the deadline."""
        deadline_s = self.stop_deadline_s if deadline_s is None else deadline_s
        self.stopping.set()
        for role in self.roles:
            if role.process and role.process.poll() is None:
                role.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + deadline_s
        for role in self.roles:
            if role.process is None:
                continue
            try:
                role.process.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", role.name, deadline_s)
                os.killpg(role.process.pid, signal.SIGKILL)
                role.process.wait()

    def forward(self, sig: int) -> None:
        """Pass ``sig`` on to every role that runs."""
        for role in self.roles:
            if role.process is not None and role.alive():
                role.process.send_signal(sig)
        log.info("%s passed on to %s", signal.Signals(sig).name, ", ".join(r.name for r in self.roles))

    def run(self, interval_s: float = 0.5, on_sighup: Callable[[], object] | None = None) -> None:
        """Start the roles and supervise them until SIGTERM/SIGINT, then stop them.

        SIGHUP calls ``on_sighup`` (the daemon validates the new settings there before passing it on);
        without one it is passed on to every role."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        hup = on_sighup or (lambda: self.forward(signal.SIGHUP))
        signal.signal(signal.SIGHUP, lambda *_: hup())
        self.start()
        while not self.stopping.is_set():
            self.tick()
            self.stopping.wait(interval_s)
        log.info("stopping %s (deadline %.0f s)", ", ".join(r.name for r in self.roles), self.stop_deadline_s)
        self.stop()
