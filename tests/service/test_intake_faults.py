"""The Healthcare API misbehaving: transient 429/503 answers retried with backoff, then success;
a request that is older than MAX_REQUEST_AGE_S and still failing ends as EXPORT_FAILED."""
from __future__ import annotations

import pytest

from tests.support import procs
from tests.support.function import request_counts, valid_request
from tests.support.hcapi import HC, unique


@pytest.fixture
def faulty_hc(logs_dir, tmp_path):
    started = []

    def start(*flags):
        svc = procs.healthcare_emulator(logs_dir, tmp_path / f"hc{len(started)}", *flags,
                                        name=f"healthcare-emulator-{unique('faulty')}")
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


def test_transient_429_503_are_retried_until_the_export_starts(make_function, faulty_hc):
    hc = faulty_hc("--fault", "export=0.7")
    api = HC(hc.url)
    f = make_function("transient", hc_url=hc.url, env={"HEALTHCARE_RETRY_BUDGET_S": "4", "INTAKE_LEASE_S": "6"})
    stores = [api.store() for _ in range(8)]  # all 8 first calls passing a 70% fault rate: p = 0.3**8 < 1e-4
    rids = {unique("t"): s for s in stores}
    for rid, store in rids.items():
        f.publish(valid_request(store, rid))
    events = f.events(8, timeout=90)
    assert {e["attributes"]["requestId"] for e in events} == set(rids)
    assert {e["attributes"]["eventType"] for e in events} == {"EXPORT_STARTED"}
    counts = request_counts(hc.url)
    assert all(counts[s]["export"] == 1 for s in stores), counts  # one export per request, however many calls
    assert sum(counts[s]["export.calls"] for s in stores) > 8, counts  # the injected faults were hit
    retries = [e for e in f.log_entries() if e["message"].startswith("Healthcare API export failed transiently")]
    assert retries and all(e["severity"] == "WARNING" and e["problem"].split()[0] in ("429", "503") for e in retries)
    assert all("requestId" in e["logging.googleapis.com/labels"] for e in retries)


def test_request_older_than_the_limit_ends_as_export_failed(make_function, faulty_hc):
    hc = faulty_hc("--fault", "export=1")
    store = HC(hc.url).store()
    f = make_function("aged", hc_url=hc.url, env={"HEALTHCARE_RETRY_BUDGET_S": "1", "INTAKE_LEASE_S": "2",
                                                  "MAX_REQUEST_AGE_S": "3"})
    rid = unique("aged")
    f.publish(valid_request(store, rid))
    [e] = f.events(1, timeout=60, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_FAILED"
    err = e["data"]["error"]
    assert err["code"] == 4 and "MAX_REQUEST_AGE_S=3" in err["message"] and "gave up" in err["message"]
    counts = request_counts(hc.url)[store]
    assert counts.get("export", 0) == 0 and counts["export.calls"] >= 2
    redeliveries = [x for x in f.log_entries() if "Pub/Sub will redeliver" in x["message"]]
    assert redeliveries  # it was retried by redelivery before giving up
    assert f.ledger.get(rid)["state"] == "FAILED"
    assert f.drain(1.5) == []
