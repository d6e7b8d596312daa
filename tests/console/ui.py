"""The console steps as a person clicks them (Selenium), and the test data they need (REST, real DICOM)."""
from __future__ import annotations

import uuid
from pathlib import Path

import requests
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from healthcare_emulator.console.names import WRITE_DISPOSITIONS
from tests.support import dicom_files
from tests.support.hcapi import HC, unique

WAIT_S = 120


def bq_dataset(base: str, project: str) -> str:
    ds = "console_" + uuid.uuid4().hex[:10]
    r = requests.post(f"{base}/bigquery/v2/projects/{project}/datasets", timeout=30,
                      json={"datasetReference": {"projectId": project, "datasetId": ds}})
    r.raise_for_status()
    return ds


def loaded_store(api: HC, tmp: Path, specs: list[dict]) -> str:
    """A new dataset and DICOM store holding one instance per spec (attribute overrides of CT_small)."""
    store = api.store(api.dataset(unique("console-ds")))
    files = []
    for i, attrs in enumerate(specs):
        attrs = dict(attrs)
        study = attrs.pop("study", None)
        files.append(dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp / f"{i}.dcm", study=study, **attrs))
    r = api.stow(store, files)
    assert r.status_code == 200, r.text
    return store


def wait(driver, condition, timeout: float = WAIT_S):
    """WebDriverWait that tolerates the page being replaced (auto-refresh) while it looks."""
    def check(d):
        try:
            return condition(d)
        except (StaleElementReferenceException, NoSuchElementException):
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(check)


def open_datasets(driver, base: str) -> None:
    driver.get(f"{base}/console")
    wait(driver, EC.presence_of_element_located((By.TAG_NAME, "h1")))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Datasets"


def open_store_actions_export(driver, base: str, store: str) -> None:
    """Steps 1-3: Datasets -> the dataset -> the store's row -> Actions -> Export."""
    dataset_id = store.split("/datasets/")[1].split("/")[0]
    store_id = store.rsplit("/", 1)[1]
    open_datasets(driver, base)
    driver.find_element(By.LINK_TEXT, dataset_id).click()
    row = wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-store="{store_id}"]')))
    row.find_element(By.CSS_SELECTOR, "details.menu summary").click()
    row.find_element(By.LINK_TEXT, "Export").click()
    wait(driver, EC.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Export DICOM store"))


def fill_export(driver, project: str, dataset: str, table: str, disposition: str, filter_uri: str = "") -> None:
    """Steps 4-9: BigQuery table, Browse -> project, dataset, table, write disposition, Export."""
    assert driver.find_element(By.ID, "dest-bigquery").is_selected()
    driver.find_element(By.CSS_SELECTOR, "#browse summary").click()
    driver.find_element(By.LINK_TEXT, project).click()
    wait(driver, lambda d: d.find_element(By.ID, "project").get_attribute("value") == project)
    Select(driver.find_element(By.ID, "bq_dataset")).select_by_visible_text(dataset)
    box = driver.find_element(By.ID, "table")
    box.clear()
    box.send_keys(table)
    label = WRITE_DISPOSITIONS[disposition]
    driver.find_element(By.XPATH, f'//label[normalize-space()="{label}"]/input').click()
    if filter_uri:
        driver.find_element(By.ID, "filter_uri").send_keys(filter_uri)
    driver.find_element(By.ID, "export-button").click()


def started_row(driver):
    """Step 10: on Operations, the row of the operation just started, once it is done."""
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "tr.op.started")))
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "tr.op.started").get_attribute("data-done") == "true")
    return driver.find_element(By.CSS_SELECTOR, "tr.op.started")
