"""The Service page on the real local stack (what `make up` runs): Pub/Sub and Firestore emulators, the
Healthcare emulator, the functions. A request published on the requests topic is followed in the browser
from the ledger and the events to EXPORT_SUCCEEDED; a rejected one shows its error and the remedy."""
from __future__ import annotations

import json
import os
import uuid

import pytest
import requests
from selenium.webdriver.common.by import By

from stack import console as stack_console
from stack import local
from tests.console import ui
from tests.support.hcapi import HC

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    saved = dict(os.environ)
    st = local.Stack(tmp_path_factory.mktemp("console-stack"), say=lambda *_: None)
    try:
        st.start()
        yield st
    finally:
        st.stop()
        os.environ.clear()
        os.environ.update(saved)


def publish(st, body: dict) -> None:
    st.publisher.publish(st.topic(local.REQUESTS_TOPIC), json.dumps(body).encode()).result(timeout=30)


def request_row(driver, rid: str):
    return driver.find_element(By.CSS_SELECTOR, f'tr.request[data-request="{rid}"]')


def test_the_service_page_follows_a_request_to_export_succeeded(browser, stack, tmp_path):
    assert stack_console.LEDGER_COLLECTION == stack.function_env()["LEDGER_COLLECTION"]
    base = stack.hc.url
    api = HC(base, project=local.PROJECT, location=local.LOCATION)
    store = ui.loaded_store(api, tmp_path, [{"PatientID": "a"}, {"PatientID": "b"}])
    bq = ui.bq_dataset(base, local.PROJECT)
    rid, bad = f"console-{uuid.uuid4().hex[:8]}", f"console-bad-{uuid.uuid4().hex[:8]}"
    browser.get(f"{base}/console/service")
    assert browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')  # it follows by itself
    publish(stack, {"requestId": rid, "dicomStore": store,
                    "bigqueryDestination": {"tableUri": f"bq://{local.PROJECT}.{bq}.svc",
                                            "writeDisposition": "WRITE_TRUNCATE"}})
    publish(stack, {"requestId": bad, "dicomStore": store, "bigqueryDestination": {"tableUri": "bq://nope"}})

    ui.wait(browser, lambda d: request_row(d, rid).get_attribute("data-state") == "SUCCEEDED", timeout=300)
    row = request_row(browser, rid)
    assert row.find_element(By.CLASS_NAME, "counter").text == "2 ok · 0 failed · 0 pending"
    assert f"bq://{local.PROJECT}.{bq}.svc" in row.text and "WRITE_TRUNCATE" in row.text

    def events_of(d, r):
        return [e.get_attribute("data-type") for e in d.find_elements(By.CSS_SELECTOR, f'tr.event[data-request="{r}"]')]
    ui.wait(browser, lambda d: {"EXPORT_STARTED", "EXPORT_SUCCEEDED"} <= set(events_of(d, rid)))
    ui.wait(browser, lambda d: request_row(d, bad).get_attribute("data-state") == "REJECTED")
    rejected = request_row(browser, bad)
    assert "tableUri" in rejected.text
    assert "publish the request again with a new requestId" in rejected.find_element(By.CLASS_NAME, "remedy").text
    ui.wait(browser, lambda d: "EXPORT_REJECTED" in events_of(d, bad))
    # newest first: the later event above the earlier one
    types = events_of(browser, rid)
    assert types.index("EXPORT_SUCCEEDED") < types.index("EXPORT_STARTED")

    # One console: the request's operation opens the dataset's Operations page, where it is OK.
    op = requests.get(stack.urls["export_status"], params={"requestId": rid}, timeout=30).json()["operation"]
    link = ui.wait(browser, lambda d: request_row(d, rid).find_element(By.LINK_TEXT, op.rsplit("/", 1)[1])
                   .get_attribute("href"))
    browser.get(link)  # followed, not clicked: the page may refresh itself between finding and clicking
    row = ui.wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'tr.op[data-operation="{op}"]'))
    assert "OK" in row.find_element(By.CLASS_NAME, "status").text


def test_without_the_stack_the_service_page_says_how_to_connect_it(browser, hc):
    browser.get(f"{hc.url}/console/service")
    assert "make up" in browser.find_element(By.ID, "service-off").text
