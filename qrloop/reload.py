"""SIGHUP: re-read the settings and hand them to the running role, which applies what is safe to change.

The one place a role's reload is wired. Each role says what it reloads (``RELOADABLE`` in the rewriter and
the learner, reward weights in the aggregator, the log level everywhere); reading and validating the settings
is the settings module's job. A file or environment that does not validate (a typo, ``publish_every = 0``,
broken TOML, a missing ``$QRLOOP_CONFIG``) must not kill a role that is running fine on its current settings:
the role keeps them, says why in the log, and counts the failure in
``qrloop_settings_reloads_total{outcome="failed"}``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from qrloop import metrics
from qrloop.settings import Settings, mask_secrets

log = logging.getLogger("qrloop.reload")
Reloader = Callable[[Settings], object]


def reload_settings(role: str, apply: Reloader) -> bool:
    """Re-read the settings and hand them to ``apply``; False (old settings kept) when they do not validate
    or ``apply`` refuses them."""
    try:
        fresh = Settings()
        apply(fresh)
    except Exception as exc:  # whatever is wrong with the new settings, the running role must go on
        metrics.SETTINGS_RELOADS.labels(role, "failed").inc()
        log.error(
            "%s: settings reload refused, keeping the current settings: %s", role, mask_secrets(str(exc))
        )
        return False
    metrics.SETTINGS_RELOADS.labels(role, "applied").inc()
    return True


def reload_on_sighup(role: str, apply: Reloader) -> None:
    """Install :func:`reload_settings` as the process's SIGHUP handler (main thread only, as signals are)."""
    signal.signal(signal.SIGHUP, lambda *_: reload_settings(role, apply))
