"""A bad qrloop.toml on SIGHUP: the running rewriter (a real ``qrloop serve`` process on the real broker and
store) keeps its settings and keeps serving, logs the refused key, counts the failure; a good file after it
is applied."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from qrloop.models import build_tiny_policy, require_policy
from qrloop.settings import REPO_ROOT, Settings
from tests.helpers import free_port, get, isolated_env, metric, store_settings, wait_for


def failed_reloads(port: int) -> float:
    return metric(port, 'qrloop_settings_reloads_total{outcome="failed",role="rewriter"}')


def serve_query(port: int) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rewrite",
        data=json.dumps({"query": "cordless drill"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def test_bad_config_on_sighup_keeps_the_role_running_on_its_old_settings(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings), seed=3)
    settings = store_settings(base_settings, unique_topic, tmp_path, tiny)
    config = tmp_path / "qrloop.toml"
    config.write_text("[rewriter]\nmax_new_tokens = 3\n")
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = isolated_env(settings, unique_topic) | {"QRLOOP_CONFIG": str(config)}
    with log_path.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "qrloop", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def logged(text: str) -> bool:
        return text in log_path.read_text(errors="replace")

    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 300, "/readyz", log_path)
        bad_files = {
            "[rewriter]\ntemprature = 0.5\n": "'rewriter.temprature' (did you mean 'rewriter.temperature'?)",
            "[rewriter]\ntemperature = 0\n": "temperature",
            "[rewriter\nbroken": "settings reload refused",
        }
        for n, (content, reason) in enumerate(bad_files.items(), start=1):
            config.write_text(content)
            server.send_signal(signal.SIGHUP)
            wait_for(lambda n=n: failed_reloads(port) == n, 60, f"failed reload {n}", log_path)  # type: ignore[misc]
            assert logged(reason), reason
            assert server.poll() is None, "a bad file does not stop the rewriter"
            assert serve_query(port)["rewrites"], "and it still serves, on its old settings"
        assert logged("keeping the current settings")

        config.write_text("[rewriter]\nmax_new_tokens = 2\n")
        server.send_signal(signal.SIGHUP)
        wait_for(lambda: logged("{'max_new_tokens': 2}"), 60, "the good reload", log_path)
        assert metric(port, 'qrloop_settings_reloads_total{outcome="applied",role="rewriter"}') == 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
