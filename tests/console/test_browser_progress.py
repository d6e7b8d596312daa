"""A running export on Operations: a progress bar from counter.success + counter.failure against the
instances selected, the page refreshing by itself until the green check. The emulator runs in its
slow-export mode (--export-rate) so the export is seen while it runs."""
from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.console import ui
from tests.support import procs
from tests.support.hcapi import HC

PROJECT = "test-project"
INSTANCES = 6


@pytest.fixture(scope="module")
def slow_hc(logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-slow"), "--export-rate", "1",
                                    "--export-workers", "0", name="healthcare-emulator-slow")
    svc.start()
    yield svc
    svc.stop()


def test_a_running_export_shows_its_progress_then_ok(browser, slow_hc, tmp_path):
    api = HC(slow_hc.url, project=PROJECT)
    store = ui.loaded_store(api, tmp_path, [{"PatientID": f"p{i}"} for i in range(INSTANCES)])
    bq = ui.bq_dataset(slow_hc.url, PROJECT)
    ui.open_store_actions_export(browser, slow_hc.url, store)
    ui.fill_export(browser, PROJECT, bq, "slow", "WRITE_EMPTY")

    def progress_seen(d):
        """The running row, read in one go (the page refreshes itself: elements go stale between reads)."""
        row = d.find_element(By.CSS_SELECTOR, "tr.op.started")
        bars = row.find_elements(By.TAG_NAME, "progress")
        if not bars or bars[0].get_attribute("max") != str(INSTANCES):
            return False
        return (int(bars[0].get_attribute("value")), row.find_element(By.CLASS_NAME, "counts").text,
                d.find_element(By.ID, "auto-refresh").is_displayed(),
                d.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]').get_attribute("content"))

    value, counts, live, refresh = ui.wait(browser, progress_seen)
    assert 0 <= value < INSTANCES and counts == f"{value} of {INSTANCES} instances"
    assert live and refresh == "2"
    # A later refresh shows more done than the first look, then the export ends with the green check.
    ui.wait(browser, lambda d: (progress_seen(d) or (INSTANCES, ""))[0] > value)
    row = ui.started_row(browser)
    assert row.find_element(By.CSS_SELECTOR, ".ok .check").value_of_css_property("background-color") == \
        "rgba(24, 128, 56, 1)"
    assert f"{INSTANCES} exported" in row.text
    assert not browser.find_elements(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')  # nothing runs: no refresh
