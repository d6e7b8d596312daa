"""The emulator's `export.overlapping` figure (per dataset, in /emulator/requestCounts): an export call that
arrives while another export call on the same dataset is still being answered. The gate tests
(tests/service/test_intake_gate.py) rely on it to show that the intake makes one call at a time."""
from __future__ import annotations

import threading

import pytest
import requests

from tests.support import procs
from tests.support.function import wait_for
from tests.support.hcapi import HC, unique


@pytest.fixture(scope="module")
def slow(logs_dir, tmp_path_factory):
    """Every export call takes at least a second to answer."""
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-overlap"), "--latency", "1.0",
                                    name=f"healthcare-emulator-{unique('overlap')}")
    svc.start()
    yield svc
    svc.stop()


def _counts(url: str) -> dict:
    return requests.get(f"{url}/emulator/requestCounts", timeout=10).json()


def _body() -> dict:
    return {"bigqueryDestination": {"tableUri": f"bq://test-project.ds.{unique('t').replace('-', '_')}"}}


def test_a_call_during_another_call_on_the_dataset_counts_as_overlapping(slow):
    api = HC(slow.url)
    dataset = api.dataset()
    first, second = api.store(dataset), api.store(dataset)
    answered = []
    t = threading.Thread(target=lambda: answered.append(api.export(first, _body()).status_code))
    t.start()
    wait_for(lambda: _counts(slow.url).get(first, {}).get("export.calls") == 1, what="the first call to arrive")
    assert api.export(second, _body()).status_code == 200  # while the first is still being answered
    t.join()
    assert answered == [200]
    assert _counts(slow.url)[dataset] == {"export.overlapping": 1}


def test_calls_one_after_another_or_on_other_datasets_do_not_overlap(slow):
    api = HC(slow.url)
    dataset = api.dataset()
    store = api.store(dataset)
    for _ in range(2):
        assert api.export(store, _body()).status_code == 200
    others = [api.store() for _ in range(2)]  # each in a dataset of its own
    threads = [threading.Thread(target=api.export, args=(s, _body())) for s in others]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    counts = _counts(slow.url)
    assert counts[store]["export"] == 2 and all(counts[s]["export"] == 1 for s in others)
    datasets = [dataset, *(s.split("/dicomStores/")[0] for s in others)]
    assert not any("export.overlapping" in counts.get(d, {}) for d in datasets)
