"""The report and optuna-dashboard in a real headless Chromium: no JavaScript error, no empty plot.

Screenshots go to ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search import report
from search.common import study as studies

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--window-size=1280,1600",
)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (.ci/run installs "
            "them: apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _js_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(800, height), 12000))
    driver.save_screenshot(str(path))
    return path


def _wait(driver, script: str, timeout: float = 30):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = driver.execute_script(script)
        if got:
            return got
        time.sleep(0.5)
    return driver.execute_script(script)


def test_report_page_in_chromium(browser, tmp_path, made_up_study, with_refit):
    st = with_refit(made_up_study(6, 6, 1), tmp_path)
    page = report.write_report(st, tmp_path / "report")
    browser.get(page.as_uri())
    # every plotly div drew traces (an empty plot has no .main-svg or no data)
    counts = _wait(
        browser,
        "const g=[...document.querySelectorAll('.js-plotly-plot')];"
        "return g.length && g.every(x => x.data && x.data.length && "
        "x.querySelector('.main-svg')) ? g.map(x => x.data.length) : null",
    )
    _shot(browser, "report.png")
    not_drawn = [t for t, fig in report.sections(st) if isinstance(fig, str)]
    assert counts and len(counts) == len(report.SECTIONS), (counts, not_drawn)
    assert not _js_errors(browser)


def test_dashboard_in_chromium(browser, tmp_path):
    import optuna

    url = studies.sqlite_url(tmp_path / "s.db")
    st = optuna.create_study(
        storage=studies.make_storage(url), study_name="pcam", direction="maximize"
    )
    for i in range(5):
        t = st.ask()
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
        for e in (1, 2):
            t.report(0.8 + 0.01 * i + 0.01 * e, e)
        if i % 2 == 0:
            st.tell(t, 0.83 + 0.01 * i)
        else:
            st.tell(t, state=optuna.trial.TrialState.PRUNED)
    port = _free_port()
    dash = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/api/studies")
        browser.get(f"{base}/dashboard/studies/1")
        text = _wait(browser, "const t=document.body.innerText; return t.includes('pcam') && t")
        _shot(browser, "dashboard.png")
        assert text and "pcam" in text
        assert not _js_errors(browser)
    finally:
        dash.terminate()
        dash.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.3)
