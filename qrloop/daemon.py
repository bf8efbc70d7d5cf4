"""``qrloop run``: the online loop's roles on one host, as supervised child processes.

Each role is its own command (``qrloop serve``, ``aggregate``, ``learn``, ``canary run``), deployable as a
separate service; this module only decides which to start, with which ports, and hands them to
:class:`qrloop.supervisor.Supervisor`, which restarts a crashed role with exponential backoff and stops them
all on SIGTERM/SIGINT. Every role answers ``/healthz``, ``/readyz`` and ``/metrics``: the rewriter on its
service port, the aggregator and the learner on ``daemon.aggregate_port`` / ``daemon.learn_port`` (the
canary job exposes no HTTP endpoint of its own).

``all`` is serve, aggregate, learn, and canary when this build has the ``qrloop canary run`` command. The
status page (``ui``, ``qrloop ui``) is a role too, started only when asked for (``--ui``, ``ui.with_run``).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qrloop.settings import Settings
from qrloop.supervisor import Backoff, Supervised, Supervisor, spawn_qrloop

log = logging.getLogger("qrloop.daemon")
KNOWN_ROLES = ("serve", "aggregate", "learn", "canary", "ui")


def canary_available() -> bool:
    """Whether ``qrloop canary run`` exists in this build (it ships separately from the daemon)."""
    try:
        from qrloop.canary_cli import app
    except ImportError:
        return False
    return any(
        c.name == "run" or getattr(c.callback, "__name__", "") == "run" for c in app.registered_commands
    )


def resolve_roles(spec: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated subset of :data:`KNOWN_ROLES`, in the loop's data-flow order."""
    names = [r.strip() for r in (spec.split(",") if isinstance(spec, str) else spec) if r.strip()]
    if names == ["all"]:
        names = ["serve", "aggregate", "learn", *(["canary"] if canary_available() else [])]
    unknown = sorted(set(names) - set(KNOWN_ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; known: {', '.join(KNOWN_ROLES)} or all")
    if "canary" in names and not canary_available():
        raise ValueError("this build has no `qrloop canary run` command")
    return [r for r in KNOWN_ROLES if r in names]


@dataclass(frozen=True)
class RolePlan:
    name: str
    argv: list[str]
    port: int | None  # where /healthz /readyz /metrics answer; None: no endpoint


def plan(settings: Settings, roles: Sequence[str]) -> list[RolePlan]:
    d = settings.daemon
    argv = {
        "serve": (["serve", "--port", str(d.serve_port)], d.serve_port),
        "aggregate": (["aggregate"], d.aggregate_port),
        "learn": (["learn"], d.learn_port),
        "canary": (["canary", "run"], None),
        "ui": (["ui", "--port", str(settings.ui.port)], settings.ui.port),
    }
    return [RolePlan(r, argv[r][0], argv[r][1]) for r in roles]


def child_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment plus the probe ports and the log format, so each child reads them."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "QRLOOP_STREAMS__METRICS_PORT": str(settings.daemon.aggregate_port),
            "QRLOOP_DPO__METRICS_PORT": str(settings.daemon.learn_port),
            "QRLOOP_LOGGING__FORMAT": settings.logging.format,
            "QRLOOP_LOGGING__LEVEL": settings.logging.level,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def build_supervisor(
    settings: Settings, roles: Sequence[str], env: Mapping[str, str] | None = None
) -> Supervisor:
    backoff = Backoff(initial_s=settings.daemon.backoff_initial_s, max_s=settings.daemon.backoff_max_s)
    supervised = [Supervised(p.name, p.argv) for p in plan(settings, roles)]
    return Supervisor(supervised, spawn_qrloop(child_env(settings, env)), backoff)


def run(settings: Settings, roles: Sequence[str]) -> int:
    """Start the roles and supervise them until SIGTERM/SIGINT; SIGHUP is passed on to every role."""
    supervisor = build_supervisor(settings, roles)
    for p in plan(settings, roles):
        where = f"probes on http://127.0.0.1:{p.port}" if p.port else "no probes"
        log.info("role %s: qrloop %s (%s)", p.name, " ".join(p.argv), where)

    def forward_hup(*_: object) -> None:
        for role in supervisor.roles:
            if role.process is not None and role.process.poll() is None:
                role.process.send_signal(signal.SIGHUP)
        log.info("SIGHUP passed on to %s", ", ".join(r.name for r in supervisor.roles))

    signal.signal(signal.SIGHUP, forward_hup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    supervisor.start()
    while not supervisor.stopping.is_set():
        supervisor.tick()
        supervisor.stopping.wait(0.5)
    log.info("stopping %s (deadline %.0f s)", ", ".join(roles), settings.daemon.stop_deadline_s)
    supervisor.stop(settings.daemon.stop_deadline_s)
    codes = {r.name: r.process.returncode for r in supervisor.roles if r.process is not None}
    log.info("all roles stopped: exit codes %s", codes)
    return 0
