"""Fault injection and limits, for the service's reliability tests.

- `--fault METHOD=RATE` / HC_EMULATOR_FAULTS: injected 429 RESOURCE_EXHAUSTED / 503 UNAVAILABLE at the
  configured rate, per method (export, operations.get, operations.list, operations.cancel);
- `--latency S` / HC_EMULATOR_LATENCY_S: added to every export and operations call;
- `--max-running-operations N`: beyond N running operations in a project, export answers 429;
- `--export-rate R`: slow-export mode, R instances per second, so an operation can be caught mid-flight;
- `GET /emulator/requestCounts`: export calls received and exports started, per store.
"""
from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import requests

from tests.support import dicom_files, procs
from tests.support.hcapi import HC

PROJECT = "faults-proj"
CALLS = 200
RATES = {"export": 0.3, "operations.get": 0.5, "operations.list": 0.2, "operations.cancel": 0.5}


def band(rate: float, n: int = CALLS, sigmas: float = 5.0) -> tuple[float, float]:
    """A generous binomial band: mean +- 5 standard deviations (fails by chance about once in 3.5 million)."""
    mean, sd = n * rate, math.sqrt(n * rate * (1 - rate))
    return mean - sigmas * sd, mean + sigmas * sd


@pytest.fixture(scope="module")
def faulty(logs_dir, tmp_path_factory):
    """Two rates from the environment (HC_EMULATOR_FAULTS), two from --fault flags."""
    svc = procs.healthcare_emulator(
        logs_dir, tmp_path_factory.mktemp("hc-faulty"),
        "--fault", f"operations.list={RATES['operations.list']}",
        "--fault", f"operations.cancel={RATES['operations.cancel']}",
        env={"HC_EMULATOR_FAULTS": f"export={RATES['export']},operations.get={RATES['operations.get']}"},
        name="healthcare-emulator-faulty")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def limited(logs_dir, tmp_path_factory):
    """Slow exports (2 s per instance), at most one running operation per project, 0.2 s added latency."""
    svc = procs.healthcare_emulator(
        logs_dir, tmp_path_factory.mktemp("hc-limited"), "--max-running-operations", "1", "--export-rate", "0.5",
        env={"HC_EMULATOR_LATENCY_S": "0.2"}, name="healthcare-emulator-limited")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults-files")
    return [dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / f"{i}.dcm") for i in range(3)]


def outcomes(call) -> Counter:
    c = Counter()
    for _ in range(CALLS):
        r = call()
        c[r.status_code] += 1
        if r.status_code in (429, 503):
            err = r.json()["error"]
            assert err["status"] == {429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}[r.status_code]
            assert err["code"] == r.status_code and "injected" in err["message"]
    return c


def assert_rate(c: Counter, rate: float, normal: int) -> None:
    faults = c[429] + c[503]
    lo, hi = band(rate)
    assert lo <= faults <= hi, (c, lo, hi)
    assert c[429] > 0 and c[503] > 0, c  # both kinds are injected
    assert c[normal] == CALLS - faults, c  # and nothing else happens


def test_faults_appear_at_the_configured_rate_per_method(faulty):
    api = HC(faulty.url, project=PROJECT)
    store = api.store()
    dataset = store.split("/dicomStores/")[0]
    missing_op = f"{dataset}/operations/1234567890123456789"

    # export: an invalid tableUri, so each call that is not faulted is a cheap 400 and starts nothing
    c = outcomes(lambda: api.export(store, {"bigqueryDestination": {"tableUri": "not-a-uri"}}))
    assert_rate(c, RATES["export"], 400)
    counts = requests.get(f"{faulty.url}/emulator/requestCounts").json()
    assert counts[store] == {"export.calls": CALLS}  # every call counted, none started

    assert_rate(outcomes(lambda: api.get(missing_op)), RATES["operations.get"], 404)
    assert_rate(outcomes(lambda: api.get(f"{dataset}/operations")), RATES["operations.list"], 200)
    assert_rate(outcomes(lambda: api.post(f"{missing_op}:cancel", json={})), RATES["operations.cancel"], 404)

    # Methods without a configured rate are never faulted.
    assert Counter(api.get(store).status_code for _ in range(50)) == Counter({200: 50})


def test_latency_slow_mode_concurrency_limit_cancel_and_request_counts(limited, three):
    api = HC(limited.url, project=PROJECT)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    bq = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                         client_options={"api_endpoint": limited.url})
    bq.create_dataset("limits")
    dataset = api.dataset()
    first, second = api.store(dataset), api.store(dataset)
    for s in (first, second):
        assert api.stow(s, three).status_code == 200
    body = {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.limits.t", "writeDisposition": "WRITE_APPEND"}}

    # Latency is added to export and operations calls.
    t0 = time.monotonic()
    r = api.export(first, body)
    assert time.monotonic() - t0 >= 0.2
    assert r.status_code == 200, r.text
    running = r.json()["name"]

    # Slow mode: the operation is seen mid-flight, with instances pending.
    deadline = time.monotonic() + 30
    while True:  # each get takes >= 0.2 s (latency): no busy loop
        t0 = time.monotonic()
        op = api.get(running).json()
        assert time.monotonic() - t0 >= 0.2
        if op["metadata"].get("counter", {}).get("pending"):
            break
        assert not op.get("done") and time.monotonic() < deadline, op
    assert op["metadata"]["counter"]["pending"] == "3" and not op.get("done")

    # A second export in the same project is refused while one runs; another project is not limited.
    r = api.export(second, body)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    other = HC(limited.url, project="other-faults-proj")
    other_store = other.store()
    assert other.stow(other_store, three[:1]).status_code == 200
    r = other.export(other_store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.limits.other"}})
    assert r.status_code == 200, r.text
    other_op = r.json()["name"]

    # Exactly one export started per store, whatever was called.
    counts = requests.get(f"{limited.url}/emulator/requestCounts").json()
    assert counts[first] == {"export.calls": 1, "export": 1}
    assert counts[second] == {"export.calls": 1}

    # Cancel the running export: it ends CANCELLED and the table is untouched.
    assert api.post(f"{running}:cancel", json={}).json() == {}
    done = api.wait(running)
    assert done["error"]["code"] == 1 and done["metadata"]["cancelRequested"] is True
    assert "response" not in done
    from google.api_core.exceptions import NotFound
    with pytest.raises(NotFound):
        bq.get_table(f"{PROJECT}.limits.t")
    assert other.post(f"{other_op}:cancel", json={}).status_code == 200
    other.wait(other_op)

    # With the slot free again, the refused export can start.
    r = api.export(second, body)
    assert r.status_code == 200, r.text
    assert api.post(f"{r.json()['name']}:cancel", json={}).status_code == 200
    assert api.wait(r.json()["name"])["error"]["code"] == 1
    counts = requests.get(f"{limited.url}/emulator/requestCounts").json()
    assert counts[second] == {"export.calls": 2, "export": 1}


def test_export_started_fault_answers_500_after_the_export_began(logs_dir, tmp_path):
    """The ambiguous failure: the caller sees 500, yet the operation exists and runs to its end."""
    from tests.support import procs
    from tests.support.hcapi import HC
    svc = procs.healthcare_emulator(logs_dir, tmp_path, "--fault", "export.started=1", name="hc-started").start()
    try:
        api = HC(svc.url)
        store = api.store()
        r = api.export(store, {"bigqueryDestination": {"tableUri": "bq://proj-1.missing.t"}})
        assert r.status_code == 500 and r.json()["error"]["status"] == "INTERNAL"
        dataset = store.split("/dicomStores/")[0]
        ops = [o for o in api.get(f"{dataset}/operations").json()["operations"]
               if o["metadata"]["apiMethodName"].endswith("ExportDicomData_bq")]
        assert len(ops) == 1
        assert api.wait(ops[0]["name"])["done"] is True
        counts = api.http.get(f"{svc.url}/emulator/requestCounts").json()
        assert counts[store] == {"export": 1, "export.calls": 1}
    finally:
        svc.stop()
