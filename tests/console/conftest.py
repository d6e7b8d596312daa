"""Browser fixtures for the console: Debian's headless Chromium driven by Selenium, no downloads.

On a failure (setup or call) the test's browser saves a screenshot and the page's HTML in
test-reports/console/ (or $CONSOLE_TEST_REPORTS), named after the test.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORTS = Path(os.environ.get("CONSOLE_TEST_REPORTS", ROOT / "test-reports" / "console"))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser():
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(binary):
            pytest.fail(f"{binary} is missing: install Debian's chromium and chromium-driver (.ci/run does)",
                        pytrace=False)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        driver = item.funcargs.get("browser") if hasattr(item, "funcargs") else None
        if driver is None:
            return
        REPORTS.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
        try:
            png = REPORTS / f"{stem}.png"
            driver.save_screenshot(str(png))
            (REPORTS / f"{stem}.html").write_text(driver.page_source, encoding="utf-8")
            report.sections.append(("console screenshot", f"{png} (page URL {driver.current_url})"))
        except Exception as e:  # noqa: BLE001 - the failure itself matters more than its picture
            report.sections.append(("console screenshot", f"could not save one: {type(e).__name__}: {e}"))
