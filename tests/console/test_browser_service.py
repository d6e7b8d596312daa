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

    def snapshot(d):
        """What the page shows, read in one go (it refreshes itself: elements go stale between reads)."""
        ok, rejected = request_row(d, rid), request_row(d, bad)
        return {"state": ok.get_attribute("data-state"), "text": ok.text,
                "counter": ok.find_element(By.CLASS_NAME, "counter").text,
                "bad_state": rejected.get_attribute("data-state"), "bad_text": rejected.text,
                "remedy": " ".join(r.text for r in rejected.find_elements(By.CLASS_NAME, "remedy")),
                "events": [e.get_attribute("data-type")
                           for e in d.find_elements(By.CSS_SELECTOR, f'tr.event[data-request="{rid}"]')],
                "bad_events": [e.get_attribute("data-type")
                               for e in d.find_elements(By.CSS_SELECTOR, f'tr.event[data-request="{bad}"]')]}

    def settled(d):
        v = snapshot(d)
        done = v["state"] == "SUCCEEDED" and v["bad_state"] == "REJECTED" and "EXPORT_REJECTED" in v["bad_events"] \
            and {"EXPORT_STARTED", "EXPORT_SUCCEEDED"} <= set(v["events"])
        return v if done else False

    v = ui.wait(browser, settled, timeout=300)
    assert v["counter"] == "2 ok · 0 failed · 0 pending"
    assert f"bq://{local.PROJECT}.{bq}.svc" in v["text"] and "WRITE_TRUNCATE" in v["text"]
    assert "tableUri" in v["bad_text"]
    assert "publish the request again with a new requestId" in v["remedy"]
    assert v["events"].index("EXPORT_SUCCEEDED") < v["events"].index("EXPORT_STARTED")  # newest first

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
