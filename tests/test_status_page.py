"""The status page (``qrloop ui``) in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium): it shows the versions of a short run, the alias moves of a rollback, the canary's
verdicts, the reward per version, the lag and the dead letters; it reloads itself and then shows a newer
version and an operator's rollback without anyone touching the browser. A screenshot is saved for people to
look at: ``artifacts/status-page.png`` in the checkout (ignored by git) and the test's temp directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from qrloop.runs import open_store
from qrloop.settings import REPO_ROOT, Settings
from tests.helpers import env_of, free_port, isolated, short_run

T = TypeVar("T")

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "artifacts"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver (scripts/setup.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--disable-dev-shm-usage", "--window-size=1280,2600",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def reread(read: Callable[[], T]) -> T:
    """``read`` again while it hits an element of a page that has since reloaded, or a page still loading:
    the page reloads itself every 2 s, so a find and the read of what it found can straddle a reload (CI
    once failed so)."""
    for _ in range(20):
        try:
            return read()
        except (StaleElementReferenceException, NoSuchElementException):  # mid-reload: not there yet
            time.sleep(0.1)
    return read()


def table_rows(driver: webdriver.Chrome, table_id: str) -> list[str]:
    return reread(lambda: [row.text for row in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tr")[1:]])


def text_of(driver: webdriver.Chrome, element_id: str) -> str:
    return reread(lambda: str(driver.find_element(By.ID, element_id).text))


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def test_status_page_in_chromium(
    base_settings: Settings,
    kafka_bootstrap: str,
    unique_topic: str,
    tmp_path: Path,
    browser: webdriver.Chrome,
) -> None:
    run = isolated(base_settings, unique_topic, f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "blobs")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), QRLOOP_UI__REFRESH_S="2", **env_of(run))
    log = (tmp_path / "ui.log").open("wb")
    # The server starts while the run is written (its imports take seconds); it reads only per request.
    server = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "ui", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        v = short_run(run, tmp_path)
        wait_until(lambda: healthy(url + "healthz") or server.poll() is not None, 120, "qrloop ui")
        assert server.poll() is None, (tmp_path / "ui.log").read_text()
        browser.get(url)

        # The short run's versions, newest first, with their status and aliases.
        versions = table_rows(browser, "versions")
        assert [row.split()[0] for row in versions] == [f"v{v[k]}" for k in ("v4", "v3", "v2", "v1")]
        assert "rejected" in versions[1] and versions[2].endswith("canary, production")
        # The lineage graph, drawn server-side: a node label per version and the aliases on theirs.
        labels = reread(lambda: {t.text for t in browser.find_elements(By.CSS_SELECTOR, "#lineage svg text")})
        assert {f"v{n}" for n in v.values()} | {"production", "canary"} <= labels
        # The canary's rollback moved its alias back from v3 to v2.
        moves = table_rows(browser, "alias-history")
        assert f"canary v{v['v3']} → v{v['v2']} set_alias canary worse: reward -0.2" in moves[0]
        assert "rollback" in " ".join(table_rows(browser, "canary-verdicts"))
        assert "inconclusive" in text_of(browser, "canary-current")
        assert [r.split()[:2] for r in table_rows(browser, "reward-table")] == [
            ["v1", "6"], ["v2", "5"], ["v3", "4"]
        ]  # fmt: skip
        assert text_of(browser, "total-lag") == "6"
        assert text_of(browser, "dead-letters") == "3"
        assert browser.find_element(By.CSS_SELECTOR, "#rewards svg") is not None

        # Meanwhile the learner publishes v5 and an operator rolls production back: the page, reloading
        # itself every 2 s, shows both without the browser being told anything.
        generated = text_of(browser, "generated")
        with open_store(run) as store:
            v5 = store.publish(tmp_path / "tiny", parent=v["v4"], base_model="start", train_steps=4).id
            store.rollback("production", reason="operator: bad night", actor="cli")
        wait_until(lambda: text_of(browser, "n-versions") == "5", 60, "the page to refresh")
        assert text_of(browser, "generated") != generated
        assert table_rows(browser, "versions")[0].split()[0] == f"v{v5}"
        newest = table_rows(browser, "alias-history")[0]
        assert f"production v{v['v2']} → v{v['v1']} rollback cli operator: bad night" in newest

        shot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(shot))
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "status-page.png")
        with Image.open(shot) as image:
            assert image.size[0] >= 1000
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
            assert len(colours) > 50, "the screenshot shows a rendered page, not a blank one"
        print(f"screenshot: {ARTIFACTS / 'status-page.png'}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_status_page_says_why_a_store_cannot_be_read(base_settings: Settings, tmp_path: Path) -> None:
    """`qrloop run --ui` may start before the database is migrated: the page stays up and says so."""
    run = base_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'empty.db'}"})
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), QRLOOP_DATABASE_URL=run.db_url)
    server = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "ui", "--port", str(port)], cwd=REPO_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: healthy(url + "healthz") or server.poll() is not None, 120, "qrloop ui")
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200
            page = response.read().decode()
        assert "policy store: OperationalError" in page and "no such table" in page
        assert "no versions published yet" in page
    finally:
        server.terminate()
        server.wait(timeout=30)
