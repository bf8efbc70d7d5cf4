"""Logging of every qrloop process: human-readable lines, or one JSON object per line for log shippers.

``configure(level, fmt)`` is called once per process (the CLI does it for each role); ``settings.logging``
holds the defaults (``QRLOOP_LOGGING__FORMAT=json``, ``qrloop run --log-format json``). The level is one of
the settings SIGHUP reloads (:func:`set_level`).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from qrloop.settings import mask_secrets

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not "extra" fields a caller attached.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, pid, role, extras."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role or os.environ.get("QRLOOP_ROLE")

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.role:
            payload["role"] = self.role
        payload.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class MaskingFormatter(logging.Formatter):
    """Any ``scheme://user:password@`` in a formatted line (message, extras, traceback) shows ``***``."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(self.inner.format(record))


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return MaskingFormatter(JsonFormatter())
    if fmt == "text":
        return MaskingFormatter(logging.Formatter(TEXT_FORMAT))
    raise ValueError(f"unknown log format {fmt!r}: text or json")


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Replace the root handlers with one stderr handler in the chosen format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("qrloop").setLevel(level.upper())
