"""Untrusted values in a real browser: a PatientName of <script>alert(1)</script> is shown as text and
runs nothing, and so are SQL results and BigQuery error messages that carry markup."""
from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from tests.console import ui
from tests.support.hcapi import HC

PROJECT = "test-project"
XSS = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'


def no_alert(browser) -> bool:
    """True when no JavaScript dialog is open (checked once the page has loaded: inline scripts ran by then)."""
    return EC.alert_is_present()(browser) is False


@pytest.fixture(scope="module")
def exported(hc, tmp_path_factory):
    api = HC(hc.url, project=PROJECT)
    store = ui.loaded_store(api, tmp_path_factory.mktemp("console-xss"), [{"PatientName": XSS, "PatientID": XSS}])
    bq = ui.bq_dataset(hc.url, PROJECT)
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{bq}.xss",
                                                             "writeDisposition": "WRITE_EMPTY"}})
    assert "error" not in op
    return {"base": hc.url, "ref": f"{PROJECT}.{bq}.xss"}


def test_a_script_patient_name_renders_as_text_in_the_preview(browser, exported):
    browser.get(f"{exported['base']}/console/bigquery/table?ref={exported['ref']}")
    preview = ui.wait(browser, EC.presence_of_element_located((By.ID, "preview")))
    assert browser.execute_script("return document.readyState") == "complete"
    assert no_alert(browser)
    headers = [th.text for th in preview.find_elements(By.CSS_SELECTOR, "thead th")]
    cells = preview.find_elements(By.CSS_SELECTOR, "tbody td")
    assert cells[headers.index("PatientID")].text == XSS
    assert XSS in cells[headers.index("PatientName")].text
    assert not preview.find_elements(By.TAG_NAME, "script")
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1  # the console's own, from /console/static


def test_markup_in_query_results_and_in_bigquery_errors_stays_text(browser, exported):
    browser.get(f"{exported['base']}/console/bigquery/query?ref={exported['ref']}")
    box = ui.wait(browser, EC.presence_of_element_located((By.ID, "sql")))
    box.send_keys(f"SELECT PatientID, '{IMG}' AS img FROM `{exported['ref']}`")
    browser.find_element(By.ID, "run").click()
    results = ui.wait(browser, EC.presence_of_element_located((By.ID, "results")))
    assert [td.text for td in results.find_elements(By.CSS_SELECTOR, "tbody td")] == [XSS, IMG]
    assert not results.find_elements(By.TAG_NAME, "img") and no_alert(browser)

    box = browser.find_element(By.ID, "sql")
    box.clear()
    box.send_keys(f"SELECT 1 FROM `{PROJECT}.nodataset.{IMG}`")
    browser.find_element(By.ID, "run").click()
    err = ui.wait(browser, EC.presence_of_element_located((By.ID, "query-error")))
    assert "onerror" in err.text
    assert not err.find_elements(By.TAG_NAME, "img") and no_alert(browser)
