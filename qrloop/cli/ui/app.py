"""``qrloop ui``: a small read-only status page on 127.0.0.1 (Starlette + Jinja2, rendered on the server).

Routes: ``/`` the page (it reloads itself every ``ui.refresh_s`` through a ``<meta http-equiv="refresh">``:
no JavaScript), ``/api/status`` the same summary as JSON (``qrloop status --json``), ``/healthz`` liveness
and ``/metrics`` (prometheus-client's process metrics), so the page is a role like the others under
``qrloop run --ui`` and Prometheus scrapes it too.

The summary is gathered at most every ``cache_s`` seconds however many browsers poll: each gathering opens
an admin client and a consumer on the broker.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DatabaseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from policy_store import PolicyStore
from qrloop.cli.ui.format import number
from qrloop.cli.ui.plots import lineage_svg, rewards_svg
from qrloop.runs import open_store
from qrloop.settings import Settings
from qrloop.status import Summary, broker_part, store_part, unreadable_store

TEMPLATES = Path(__file__).with_name("templates")
VERDICT_COLOURS = {"promote": "good", "rollback": "bad"}


class SummaryCache:
    """The latest summary, gathered again once it is older than ``cache_s``."""

    def __init__(self, store: PolicyStore, settings: Settings, cache_s: float = 2.0) -> None:
        self.store = store
        self.settings = settings
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._summary: Summary | None = None
        self._at = 0.0

    def get(self) -> Summary:
        with self._lock:
            if self._summary is None or time.monotonic() - self._at > self.cache_s:
                try:
                    summary = store_part(self.store, self.settings, versions=self.settings.ui.versions)
                except DatabaseError as exc:  # e.g. not migrated yet: the page says so and keeps polling
                    summary = unreadable_store(self.settings, exc)
                broker_part(summary, self.settings)
                self._summary, self._at = summary, time.monotonic()
            return self._summary


def build_app(store: PolicyStore, settings: Settings, cache_s: float = 2.0) -> Starlette:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["fmt"] = number
    cache = SummaryCache(store, settings, cache_s)

    def page(request: Request) -> Response:
        summary = cache.get()
        context = {
            "s": summary,
            "settings": settings,
            "refresh_s": settings.ui.refresh_s,
            "lineage_svg": lineage_svg(summary.versions) if summary.versions else "",
            "rewards_svg": rewards_svg(summary.rewards) if summary.rewards else "",
            "verdict_class": lambda verdict: VERDICT_COLOURS.get(str(verdict), "neutral"),
        }
        return templates.TemplateResponse(request, "status.html", context)

    def api(_: Request) -> Response:
        return JSONResponse(cache.get().as_dict())

    def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True, "role": "ui"})

    def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/", page),
        Route("/api/status", api),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
    ]
    return Starlette(routes=routes)


def serve(settings: Settings, port: int) -> None:
    """Serve the page on 127.0.0.1:port until SIGTERM/SIGINT (uvicorn handles both)."""
    with open_store(settings) as store:
        uvicorn.run(build_app(store, settings), host="127.0.0.1", port=port, log_level="warning")
