"""The documented console steps, in headless Chromium: Datasets -> store -> Actions -> Export -> project,
dataset, table -> each write disposition -> Operations until OK -> View details; then the BigQuery pages
and the documentation's two example queries; WRITE_EMPTY onto a non-empty table shows the error."""
from __future__ import annotations

import json

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from tests.console import ui
from tests.support.hcapi import HC

PROJECT = "test-project"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.701", "1.2.826.0.1.3680043.8.498.702"


@pytest.fixture(scope="module")
def world(hc, tmp_path_factory):
    api = HC(hc.url, project=PROJECT)
    store = ui.loaded_store(api, tmp_path_factory.mktemp("console-flow"), [
        {"study": STUDY_A, "PatientID": "19045", "StudyDate": "20240102", "StudyTime": "101500"},
        {"study": STUDY_A, "PatientID": "19045", "StudyDate": "20240102", "StudyTime": "101500"},
        {"study": STUDY_B, "PatientID": "other", "StudyDate": "20230101", "StudyTime": "080000"},
    ])
    return {"base": hc.url, "store": store, "bq": ui.bq_dataset(hc.url, PROJECT), "table": "dicom_console"}


def export(browser, world, disposition: str):
    ui.open_store_actions_export(browser, world["base"], world["store"])
    ui.fill_export(browser, PROJECT, world["bq"], world["table"], disposition)
    return ui.started_row(browser)


def row_count(browser, world) -> int:
    browser.get(f"{world['base']}/console/bigquery?project={PROJECT}")
    browser.find_element(By.LINK_TEXT, world["table"]).click()
    return int(ui.wait(browser, EC.presence_of_element_located((By.ID, "row-count"))).text)


def test_the_datasets_page_shows_the_store_with_its_instance_count(browser, world):
    ui.open_datasets(browser, world["base"])
    dataset_id = world["store"].split("/datasets/")[1].split("/")[0]
    browser.find_element(By.LINK_TEXT, dataset_id).click()
    row = ui.wait(browser, EC.presence_of_element_located(
        (By.CSS_SELECTOR, f'tr[data-store="{world["store"].rsplit("/", 1)[1]}"]')))
    assert row.find_element(By.CLASS_NAME, "instances").text == "3"
    export_link = row.find_element(By.CSS_SELECTOR, "a.action-export")
    assert not export_link.is_displayed()  # inside the closed Actions menu
    row.find_element(By.CSS_SELECTOR, "details.menu summary").click()
    assert export_link.is_displayed() and export_link.text == "Export"


def test_the_table_name_is_checked_as_the_person_types(browser, world):
    ui.open_store_actions_export(browser, world["base"], world["store"])
    box = browser.find_element(By.ID, "table")
    box.send_keys("bad$name")
    problem = browser.find_element(By.ID, "table-problem")
    ui.wait(browser, lambda d: "'$' is not allowed" in problem.text)
    box.clear()
    box.send_keys("good name-ü_1")
    ui.wait(browser, lambda d: problem.text == "")
    # The server checks too: a name the browser would refuse, sent anyway, comes back with the rule.
    browser.execute_script("document.getElementById('table').setCustomValidity('');"
                           "document.getElementById('table').value = 'a.b';"
                           "document.getElementById('export-form').noValidate = true;")
    browser.find_element(By.CSS_SELECTOR, "#browse summary").click()
    browser.find_element(By.LINK_TEXT, PROJECT).click()
    ui.wait(browser, lambda d: d.find_element(By.ID, "project").get_attribute("value") == PROJECT)
    ui.Select(browser.find_element(By.ID, "bq_dataset")).select_by_visible_text(world["bq"])
    browser.execute_script("var f = document.getElementById('export-form'); f.noValidate = true;"
                           "document.getElementById('table').value = 'a.b'; f.submit();")
    err = ui.wait(browser, EC.presence_of_element_located((By.ID, "export-error")))
    assert "'.' is not allowed" in err.text


def test_each_disposition_through_the_console_then_write_empty_shows_the_error(browser, world):
    # WRITE_EMPTY onto a new table: created, 3 rows.
    row = export(browser, world, "WRITE_EMPTY")
    assert row.find_element(By.CSS_SELECTOR, ".status .ok").text.endswith("OK")
    assert "3 exported" in row.text
    op = row.get_attribute("data-operation")
    main = browser.current_window_handle
    row.find_element(By.LINK_TEXT, "View details").click()
    ui.wait(browser, lambda d: len(d.window_handles) == 2)
    browser.switch_to.window([h for h in browser.window_handles if h != main][0])
    log = json.loads(ui.wait(browser, EC.presence_of_element_located((By.TAG_NAME, "body"))).text)
    assert log["operation"] == op and log["entries"] == []
    browser.close()
    browser.switch_to.window(main)
    assert row_count(browser, world) == 3

    row = export(browser, world, "WRITE_APPEND")
    assert "OK" in row.find_element(By.CLASS_NAME, "status").text
    assert row_count(browser, world) == 6

    row = export(browser, world, "WRITE_TRUNCATE")
    assert "OK" in row.find_element(By.CLASS_NAME, "status").text
    assert row_count(browser, world) == 3

    row = export(browser, world, "WRITE_EMPTY")
    status = row.find_element(By.CLASS_NAME, "status")
    assert status.find_element(By.CLASS_NAME, "code").text == "9"
    assert f"bq://{PROJECT}.{world['bq']}.{world['table']}" in status.find_element(By.CLASS_NAME, "message").text
    assert not row.find_elements(By.CSS_SELECTOR, ".ok")
    assert row_count(browser, world) == 3  # the failed export left the table as it was
    # Operations lists every operation of the dataset, newest first: the four exports, then the dataset's creation.
    dataset = world["store"].split("/dicomStores/")[0]
    browser.get(f"{world['base']}/console/operations?dataset={dataset}")
    ops = browser.find_elements(By.CSS_SELECTOR, "tr.op")
    methods = [o.find_elements(By.TAG_NAME, "td")[1].text for o in ops]
    assert methods == ["ExportDicomData_bq"] * 4 + ["CreateDataset"]
    created = [o.find_elements(By.TAG_NAME, "td")[3].text for o in ops]
    assert created == sorted(created, reverse=True)


def test_bigquery_schema_tree_preview_and_the_two_example_queries(browser, world):
    export(browser, world, "WRITE_TRUNCATE")
    browser.get(f"{world['base']}/console/bigquery?project={PROJECT}")
    assert world["bq"] in browser.find_element(By.ID, "explorer").text
    browser.find_element(By.LINK_TEXT, world["table"]).click()
    ui.wait(browser, EC.presence_of_element_located((By.ID, "schema")))
    assert browser.find_element(By.ID, "row-count").text == "3"
    # The schema as a tree: PatientName is a RECORD whose children show once it is opened.
    node = browser.find_element(By.XPATH, '//ul[@id="schema"]/li[.//summary/span[@class="fname" and text()="PatientName"]]')
    summary = node.find_element(By.TAG_NAME, "summary")
    assert summary.find_element(By.CLASS_NAME, "ftype").text == "RECORD"
    assert summary.find_element(By.CLASS_NAME, "fmode").text == "NULLABLE"
    child = node.find_element(By.XPATH, './/details/ul/li[.//span[@class="fname" and text()="Alphabetic"]]')
    assert not child.is_displayed()
    summary.click()
    assert child.is_displayed()
    patient_id = browser.find_element(By.XPATH, '//ul[@id="schema"]/li[span[@class="fname" and text()="PatientID"]]')
    assert patient_id.find_element(By.CLASS_NAME, "ftype").text == "STRING"
    preview = browser.find_element(By.ID, "preview")
    headers = [th.text for th in preview.find_elements(By.CSS_SELECTOR, "thead th")]
    pid = headers.index("PatientID")
    values = sorted(tr.find_elements(By.TAG_NAME, "td")[pid].get_attribute("textContent")
                    for tr in preview.find_elements(By.CSS_SELECTOR, "tbody tr"))
    assert values == ["19045", "19045", "other"]

    browser.find_element(By.ID, "query-table").click()
    browser.find_element(By.ID, "example-1").click()
    sql = browser.find_element(By.ID, "sql").get_attribute("value")
    assert f"`{PROJECT}.{world['bq']}.{world['table']}`" in sql and "WHERE PatientID = '19045'" in sql
    browser.find_element(By.ID, "run").click()
    results = ui.wait(browser, EC.presence_of_element_located((By.ID, "results")))
    assert [th.text for th in results.find_elements(By.CSS_SELECTOR, "thead th")] == ["DICOMwebPath"]
    paths = [td.text for td in results.find_elements(By.CSS_SELECTOR, "tbody td")]
    assert len(paths) == 2 and all(p.startswith(f"/dicomWeb/studies/{STUDY_A}/series/") for p in paths)

    browser.find_element(By.ID, "example-2").click()
    browser.find_element(By.ID, "run").click()
    results = ui.wait(browser, EC.presence_of_element_located((By.ID, "results")))
    assert [th.text for th in results.find_elements(By.CSS_SELECTOR, "thead th")] == \
        ["StudyDateTime", "PatientID", "StudyInstanceUID", "InstanceCount"]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in results.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert rows == [["2024-01-02 10:15:00", "19045", STUDY_A, "2"],
                    ["2023-01-01 08:00:00", "other", STUDY_B, "1"]]

    sql_box = browser.find_element(By.ID, "sql")
    sql_box.clear()
    sql_box.send_keys(f"SELECT nothing FROM `{PROJECT}.{world['bq']}.no_such_table`")
    browser.find_element(By.ID, "run").click()
    err = ui.wait(browser, EC.presence_of_element_located((By.ID, "query-error")))
    assert "no_such_table" in err.text and "Not found" in err.text
    assert not browser.find_elements(By.ID, "results")
