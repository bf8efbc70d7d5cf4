"""SIGHUP: re-read the settings and hand them to the running role, which applies what is safe to change.

The one place a role's reload is wired. Each role says what it reloads (``RELOADABLE`` in the rewriter and
the learner, reward weights in the aggregator); reading the settings again is the settings module's job.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from qrloop.settings import Settings


def fresh_settings() -> Settings:
    """The settings as they are now (environment and ``qrloop.toml`` read again)."""
    return Settings()


def on_sighup(apply: Callable[[Settings], object]) -> None:
    """Call ``apply(fresh settings)`` on every SIGHUP this process receives."""
    signal.signal(signal.SIGHUP, lambda *_: apply(fresh_settings()))
