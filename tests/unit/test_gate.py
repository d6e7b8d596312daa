"""The gate's rules (handlers/core/gate.py): pure, no emulator."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from urllib.parse import unquote

import pytest

from handlers.core import gate as G
from handlers.core.ledger import DELETE, RECEIVED, STARTED, STARTING

T = datetime(2026, 12, 2, 12, 0, 0, tzinfo=timezone.utc)
DATASET = "projects/p/locations/us-central1/datasets/d"


def _gate(holder="r-1", lease_s=10.0, acquired_at=T) -> G.Gate:
    return G.Gate(DATASET, holder, "inst:abc", T + timedelta(seconds=lease_s), acquired_at)


def _op(name, created, method="google.cloud.healthcare.v1.dicom.DicomService.ExportDicomData_bq"):
    return {"name": f"{DATASET}/operations/{name}",
            "metadata": {"apiMethodName": method, "createTime": created}}


def test_gate_ids_are_injective_and_hold_no_slash():
    names = [DATASET, DATASET + "x", "projects/p/locations/us-central1/datasets/d%2F", "projects/p/l/d/x"]
    ids = [G.gate_id(n) for n in names]
    assert len(set(ids)) == len(ids) and not any("/" in i for i in ids)
    assert [unquote(i) for i in ids] == names
    assert G.collection("dicomExports") == "dicomExports-gates"


def test_a_gate_round_trips_through_its_fields():
    g = _gate()
    assert G.Gate.of(g.fields()) == g
    assert set(g.fields()) == {"dataset", "holder", "owner", "leaseUntil", "acquiredAt"}


@pytest.mark.parametrize(("gate", "at", "verdict"), [
    (None, T, G.FREE),
    (_gate("r-1"), T + timedelta(hours=1), G.MINE),  # this request's own gate, whatever its lease
    (_gate("r-2"), T, G.HELD),
    (_gate("r-2"), T + timedelta(seconds=9.999), G.HELD),
    (_gate("r-2"), T + timedelta(seconds=10), G.ABANDONED),  # the lease ends at leaseUntil
    (_gate("r-2"), T + timedelta(seconds=11), G.ABANDONED),
])
def test_judge(gate, at, verdict):
    assert G.judge(gate, "r-1", at) == verdict


def test_the_holders_document_decides_a_takeover():
    g = _gate("r-2", lease_s=-1)
    starting = {"state": STARTING, "gateAcquiredAt": T}
    assert G.holder_verdict(None, g, T) == G.STALE  # the document is gone
    assert G.holder_verdict({**starting, "state": STARTED}, g, T) == G.STALE  # it recorded its operation
    assert G.holder_verdict({**starting, "gateAcquiredAt": T - timedelta(seconds=1)}, g, T) == G.STALE  # another attempt
    assert G.holder_verdict(starting, g, T) == G.RECOVER
    assert G.holder_verdict({**starting, "leaseUntil": T}, g, T) == G.RECOVER  # its lease ended
    assert G.holder_verdict({**starting, "leaseUntil": T + timedelta(seconds=1)}, g, T) == G.BUSY  # its redelivery


def test_the_window_of_a_call_starts_when_the_gate_was_taken():
    assert G.window_start({"state": RECEIVED, "firstAttemptAt": T - timedelta(hours=1)}, T) == T  # no call in flight
    assert G.window_start({"state": STARTING, "gateAcquiredAt": T - timedelta(seconds=5),
                           "firstAttemptAt": T - timedelta(hours=1)}, T) == T - timedelta(seconds=5)
    # a STARTING document written before gates: since its first attempt
    assert G.window_start({"state": STARTING, "firstAttemptAt": T - timedelta(hours=1)}, T) == T - timedelta(hours=1)


def test_candidates_are_export_operations_created_since_the_gate_minus_the_clock_skew():
    edge = (T - G.CLOCK_SKEW).isoformat().replace("+00:00", "Z")
    ops = [_op("in", "2026-12-02T12:00:01.123456789Z"), _op("edge", edge),
           _op("before", "2026-12-02T11:58:59.999Z"), _op("import", "2026-12-02T12:00:01Z", method="ImportDicomData"),
           _op("unreadable", "yesterday"), {"name": "no-metadata"}]
    assert [op["name"].rsplit("/", 1)[1] for op in G.candidates(ops, T)] == ["in", "edge"]


def test_at_most_one_unclaimed_candidate_belongs_to_the_holder():
    g = _gate()
    assert G.sole([], g) is None
    op = _op("a", "2026-12-02T12:00:01Z")
    assert G.sole([op], g) is op
    with pytest.raises(G.InvariantBroken) as e:
        G.sole([op, _op("b", "2026-12-02T12:00:02Z")], g)
    message = str(e.value)
    assert message.startswith("invariant broken: one export call per dataset at a time")
    assert f"{DATASET}/operations/a" in message and f"{DATASET}/operations/b" in message and "r-1" in message


def test_an_attempt_takes_the_gate_under_a_new_lease():
    until = T + timedelta(seconds=60)
    first = G.attempt({"state": RECEIVED, "attempts": 0}, owner="me", lease_until=until, acquired_at=T, t=T)
    assert first == {"state": STARTING, "lastAttemptAt": T, "attempts": 1, "gateAcquiredAt": T, "leaseOwner": "me",
                     "leaseUntil": until, "updatedAt": T, "firstAttemptAt": T}
    earlier = T - timedelta(minutes=5)
    again = G.attempt({"state": STARTING, "attempts": 1, "firstAttemptAt": earlier, "recoveringBy": "x"},
                      owner="me", lease_until=until, acquired_at=earlier, t=T)
    assert again["attempts"] == 2 and "firstAttemptAt" not in again and again["gateAcquiredAt"] == earlier
    assert again["recoveringBy"] is DELETE  # a field of documents written before gates


def test_a_holder_whose_call_never_started_has_no_call_in_flight():
    updates = G.no_call(T)
    assert updates["state"] == RECEIVED
    assert updates["gateAcquiredAt"] is DELETE and updates["leaseOwner"] is DELETE and updates["leaseUntil"] is DELETE
