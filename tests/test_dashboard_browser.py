"""End to end: the dashboard served by ``streamlit run`` as ``medbloom dashboard`` serves
it, opened in a real headless Chromium, charts rendered, screenshots saved.

Needs Debian's ``chromium`` and ``chromium-driver``: installed here with apt-get when
missing and running as root, else the test is skipped. Screenshots go to the test's
``tmp_path`` and are copied to ``/tmp/medbloom-dashboard-*.png`` for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from medbloom.dashboard import dashboard_command
from test_dashboard import RunWriter, write_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,900",
)
WINDOW = (1400, 900)


def _ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver if missing (root only), else skip."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(
            f"{CHROMIUM} or {CHROMEDRIVER} missing and not root: install them with "
            "`apt-get install chromium chromium-driver`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            pytest.skip(f"`{' '.join(cmd)}` failed: {' '.join(tail)}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} or {CHROMEDRIVER} is absent")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the dashboard exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the dashboard did not answer within {timeout:.0f} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server this test started, by its PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _charts_drawn(driver: Any, at_least: int) -> bool:
    """True once ``at_least`` Vega charts have drawn their canvas or SVG marks."""
    return bool(
        driver.execute_script(
            """
            const charts = document.querySelectorAll('[data-testid="stVegaLiteChart"]');
            let drawn = 0;
            for (const c of charts) {
                const svg = c.querySelector('svg.marks');
                const canvas = c.querySelector('canvas.marks');
                const box = (svg || canvas) ? (svg || canvas).getBoundingClientRect() : null;
                if (box && box.width > 50 && box.height > 50) drawn++;
            }
            return drawn >= arguments[0];
            """,
            at_least,
        )
    )


def _shot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    shutil.copyfile(path, Path("/tmp") / f"medbloom-dashboard-{name}.png")
    return path


def _body(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


@pytest.mark.slow
def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    """A live run's page grows round by round on its own, then shows it finished."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _ensure_chromium()
    runs = tmp_path / "runs"
    runs.mkdir()
    write_run(runs, "20261124-0900-pneumoniamnist-fedprox", "failed", done=4, strategy="fedprox")
    write_run(runs, "20261124-1000-pneumoniamnist-fedavg", "finished", rounds=12, num_clients=8)
    live = RunWriter(
        runs,
        "20261124-1100-dermamnist-fedavg",
        dataset="dermamnist",
        rounds=6,
        num_clients=6,
        seed=2,
        started_ago=3 * 35.0 + 5,
    )
    for _ in range(4):  # rounds 0 to 3
        live.next_round()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            dashboard_command(runs, port, "127.0.0.1"), stdout=out, stderr=subprocess.STDOUT
        )
    driver = None
    try:
        _wait_healthy(url, proc, log, timeout=40)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        # Size the window so that the page itself (the viewport) is WINDOW.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        outer = driver.get_window_size()
        driver.set_window_size(
            WINDOW[0] + outer["width"] - inner[0], WINDOW[1] + outer["height"] - inner[1]
        )
        driver.get(url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.3)
        wait.until(lambda d: "round 3 of 6" in _body(d))  # the newest run is shown first
        wait.until(lambda d: _charts_drawn(d, 3))  # the three learning curves
        time.sleep(0.5)  # let the last chart finish its transition
        body = _body(driver)
        assert "Running" in body and "left" in body  # status and estimated time left
        assert "20261124-0900-pneumoniamnist-fedprox" in body  # the picker lists every run
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        shots = [_shot(driver, tmp_path, "live")]

        # The run goes on: the page follows without a reload, then shows it finished.
        live.next_round()
        wait.until(lambda d: "round 4 of 6" in _body(d))
        live.next_round()
        live.next_round()
        live.recorder.close("finished")
        wait.until(lambda d: "Finished" in _body(d) and "round 6 of 6" in _body(d))
        wait.until(lambda d: _charts_drawn(d, 3))
        time.sleep(0.5)
        assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        shots.append(_shot(driver, tmp_path, "overview"))

        tab = next(
            t
            for t in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stTab"]')
            if "Hospitals" in t.text
        )
        tab.click()
        wait.until(lambda d: _charts_drawn(d, 3))  # partition, train loss, participation
        time.sleep(0.5)
        assert "6 hospitals" in _body(driver)
        shots.append(_shot(driver, tmp_path, "hospitals"))

        for shot in shots:
            data = shot.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    finally:
        if driver is not None:
            driver.quit()
        _stop(proc)
    assert proc.returncode is not None
