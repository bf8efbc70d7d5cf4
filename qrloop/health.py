"""The probes and metrics endpoint of a role that has no HTTP server of its own (aggregator, learner).

``serve(port, checks)`` starts a daemon thread answering on 127.0.0.1:port:

- ``/healthz``  liveness: 200 while the role's main loop beats its :class:`Heartbeat` (the learner's poll
  loop, the aggregator's timer on the event loop), 503 with the heartbeat's age once past its limit.
  A thread answering 200 on its own would say nothing about a loop that is stuck; ``qrloop run`` restarts
  a role whose liveness fails (``qrloop.supervisor``);
- ``/readyz``   200 when every check passes, else 503, with each check's result as JSON (readiness: the
  broker, the database and the model are reachable);
- ``/metrics``  the process's prometheus-client registry (``qrloop.metrics``).

A check is a function returning a short detail string, raising when not ready. Checks run on each request,
at most every ``cache_s`` seconds, so a prober polling every second does not hammer the broker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.engine import make_url

log = logging.getLogger("qrloop.health")
Check = Callable[[], str]


def kafka_check(bootstrap_servers: str, timeout_s: float = 1.0) -> Check:
    """The broker accepts a TCP connection on one of its bootstrap addresses."""

    def check() -> str:
        errors = []
        for address in bootstrap_servers.split(","):
            host, _, port = address.strip().rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=timeout_s):
                    return f"{address} reachable"
            except OSError as exc:
                errors.append(f"{address}: {exc}")
        raise ConnectionError("; ".join(errors))

    return check


def database_check(url: str) -> Check:
    """``select 1`` through a small dedicated engine (the role's own pool stays untouched)."""
    engine = sa.create_engine(url)

    def check() -> str:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        return make_url(url).render_as_string(hide_password=True)

    return check


class Heartbeat:
    """When a role's main loop last went round; ``alive()`` while that is within ``max_age_s``.

    The loop calls ``beat()`` once per iteration (cheap: one clock read). Work that legitimately takes long
    (a DPO step, a publish) must stay below ``max_age_s`` (``daemon.liveness_max_age_s``).
    """

    def __init__(
        self, max_age_s: float, start_grace_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()
        # Until the first beat the role is still loading (models, the consumer group): allow for that too.
        self._limit = max_age_s + start_grace_s

    def beat(self) -> None:
        self._last = self._clock()
        self._limit = self.max_age_s

    def age_s(self) -> float:
        return self._clock() - self._last

    def alive(self) -> bool:
        return self.age_s() <= self._limit

    def describe(self) -> dict[str, Any]:
        return {"ok": self.alive(), "age_s": round(self.age_s(), 3), "max_age_s": self._limit}


def thread_check(thread: threading.Thread, heartbeat: Heartbeat | None = None) -> Check:
    """A background thread (the rewriter's announcement follower) is running, and its loop is going round."""

    def check() -> str:
        if not thread.is_alive():
            raise RuntimeError(f"thread {thread.name} has stopped")
        if heartbeat is not None and not heartbeat.alive():
            raise RuntimeError(f"thread {thread.name} stuck for {heartbeat.age_s():.0f} s")
        return f"{thread.name} running"

    return check


class Probes:
    def __init__(self, checks: Mapping[str, Check], cache_s: float = 2.0) -> None:
        self.checks = dict(checks)
        self.cache_s = cache_s
        self._last: tuple[float, bool, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            if self._last and time.monotonic() - self._last[0] < self.cache_s:
                return self._last[1], self._last[2]
            results: dict[str, Any] = {}
            for name, check in self.checks.items():
                try:
                    results[name] = {"ok": True, "detail": check()}
                except Exception as exc:  # any failure means not ready; say which and why
                    results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
            ok = all(r["ok"] for r in results.values())
            self._last = (time.monotonic(), ok, results)
            return ok, results


def _respond(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def liveness(heartbeat: Heartbeat | None, role: str) -> tuple[int, dict[str, Any]]:
    """``/healthz``'s status and body: 503 once the main loop's heartbeat is too old."""
    body: dict[str, Any] = {"ok": True, "role": role, "pid": os.getpid()}
    if heartbeat is not None:
        body.update(heartbeat.describe())
    return (200 if body["ok"] else 503), body


def serve(
    port: int, checks: Mapping[str, Check], role: str = "", heartbeat: Heartbeat | None = None
) -> ThreadingHTTPServer | None:
    """Start the endpoints on 127.0.0.1:port in a daemon thread; port 0: none (returns None)."""
    if not port:
        return None
    probes = Probes(checks)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                status, alive = liveness(heartbeat, role)
                _respond(self, status, json.dumps(alive).encode(), "application/json")
            elif self.path == "/readyz":
                ok, results = probes.ready()
                body = json.dumps({"ok": ok, "role": role, "checks": results}).encode()
                _respond(self, 200 if ok else 503, body, "application/json")
            elif self.path == "/metrics":
                _respond(self, 200, generate_latest(), CONTENT_TYPE_LATEST)
            else:
                _respond(self, 404, b'{"error": "not found"}', "application/json")

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name=f"health-{port}", daemon=True).start()
    log.info("%s: /healthz /readyz /metrics on 127.0.0.1:%d", role or "health", port)
    return server
