"""``qrloop run``: the online loop's roles on one host, as supervised child processes.

Each role is its own command (``qrloop serve``, ``aggregate``, ``learn``, ``canary run``), deployable as a
separate service; this module only decides which to start, with which ports, and hands them to
:class:`qrloop.cli.supervisor.Supervisor`, which restarts a crashed role with exponential backoff and stops
them all on SIGTERM/SIGINT. Every role answers ``/healthz``, ``/readyz`` and ``/metrics``: the rewriter on its
service port, the aggregator and the learner on ``daemon.aggregate_port`` / ``daemon.learn_port`` (the
canary job exposes no HTTP endpoint of its own).

``all`` is serve, aggregate, learn, and canary when this build has the ``qrloop canary run`` command. The
status page (``ui``, ``qrloop ui``) is a role too, started only when asked for (``--ui``, ``ui.with_run``).

Beside the roles, the daemon applies the retention policy every ``retention.interval_s`` (in a thread, so
supervision never waits for it): old versions are archived and their weights freed, as
``qrloop policy gc --retention`` does (see ``policy_store.retention``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from policy_store.retention import RetentionRule
from qrloop import logs
from qrloop.cli.canary import app as canary_app
from qrloop.cli.supervisor import Backoff, Liveness, Supervised, Supervisor, spawn_qrloop
from qrloop.reload import reload_settings
from qrloop.runs import open_store
from qrloop.settings import RetentionSettings, Settings

log = logging.getLogger("qrloop.daemon")
KNOWN_ROLES = ("serve", "aggregate", "learn", "canary", "ui")


def canary_available() -> bool:
    """Whether ``qrloop canary run`` exists in this build (it ships separately from the daemon)."""
    return any(
        c.name == "run" or getattr(c.callback, "__name__", "") == "run"
        for c in canary_app.registered_commands
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
    d = settings.daemon
    backoff = Backoff(initial_s=d.backoff_initial_s, max_s=d.backoff_max_s)
    liveness = Liveness(interval_s=d.liveness_interval_s, start_grace_s=d.liveness_start_grace_s)
    supervised = [
        Supervised(p.name, p.argv, liveness_url=f"http://127.0.0.1:{p.port}/healthz" if p.port else None)
        for p in plan(settings, roles)
    ]
    return Supervisor(
        supervised, spawn_qrloop(child_env(settings, env)), backoff, d.stop_deadline_s, liveness
    )


def retention_defaults(config: RetentionSettings) -> tuple[RetentionRule, timedelta]:
    """The settings' retention rule and the grace of unreferenced blobs."""
    rule = RetentionRule(config.keep_last, timedelta(hours=config.keep_younger_than_h))
    return rule, timedelta(hours=config.blob_grace_h)


def apply_retention(settings: Settings) -> None:
    """One pass of the retention policy with the settings' rule; failures are logged, never raised."""
    config = settings.retention
    rule, grace = retention_defaults(config)
    try:
        with open_store(settings) as store:
            store.apply_retention(rule, blob_grace=grace, actor="daemon")
    except Exception:  # a full disk or a database hiccup must not take the daemon (and every role) down
        log.exception("retention pass failed; retrying in %.0f s", config.interval_s)


def start_retention(settings: Settings, stopping: threading.Event) -> threading.Thread | None:
    """Apply the retention policy every ``retention.interval_s`` until ``stopping`` is set (None: off)."""
    if not settings.retention.enabled:
        return None

    def loop() -> None:
        while not stopping.wait(settings.retention.interval_s):
            apply_retention(settings)

    thread = threading.Thread(target=loop, name="retention", daemon=True)
    thread.start()
    return thread


def run(settings: Settings, roles: Sequence[str]) -> int:
    """Start the roles and supervise them until SIGTERM/SIGINT; SIGHUP is passed on to every role."""
    supervisor = build_supervisor(settings, roles)
    for p in plan(settings, roles):
        where = f"probes on http://127.0.0.1:{p.port}" if p.port else "no probes"
        log.info("role %s: qrloop %s (%s)", p.name, " ".join(p.argv), where)

    def forward_hup(fresh: Settings) -> None:
        # Only settings that validate are passed on (each role would refuse the others on its own anyway).
        logs.set_level(fresh.logging.level)
        supervisor.forward(signal.SIGHUP)

    start_retention(settings, supervisor.stopping)
    supervisor.run(on_sighup=lambda: reload_settings("daemon", forward_hup))
    codes = {r.name: r.process.returncode for r in supervisor.roles if r.process is not None}
    log.info("all roles stopped: exit codes %s", codes)
    return 0
