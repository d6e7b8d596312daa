"""Item 7: the Healthcare emulator against hostile input, over raw http.client (no client-side path
normalisation): path-traversal-like ids and UIDs, oversized and malformed STOW bodies, concurrent STOW of one
instance. Expected: a clear 4xx, nothing written outside the data dir, the server still serving."""
from __future__ import annotations

import http.client
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique
from tests.support.reliability import SIZES, report

P = "projects/test-project/locations/us-central1"


def _snapshot(root: Path, skip: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        out |= {os.path.join(dirpath, f) for f in filenames + dirnames}
    return out


def _raw(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        h = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in h.items():
            c.putheader(k, v)
        c.endheaders()
        if body:
            c.send(body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _multipart(parts: list[bytes], boundary: str = "b0undary", close: bool = True) -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def test_hostile_ids_bodies_and_concurrent_stow(logs_dir, tmp_path):
    sandbox = tmp_path / "sandbox"
    data_dir = sandbox / "data"
    sandbox.mkdir()
    (sandbox / "sentinel.txt").write_text("x")
    hc = procs.healthcare_emulator(logs_dir, data_dir, name=f"healthcare-emulator-{unique('hard')}").start()
    try:
        api = HC(hc.url)
        store = api.store()
        before = _snapshot(tmp_path, data_dir)
        port = hc.port
        evil = "evil" + uuid.uuid4().hex[:8]
        results = []  # (case, status)

        # -- ids and paths ---------------------------------------------------------------------------
        for ds_id in ["..", ".", f"../../{evil}", f"..%2F..%2F{evil}", f"%2e%2e%2f{evil}", f"{evil}/x", "",
                      "a" * 5000, f"{evil}\x00", "%00", f"..\\..\\{evil}"]:
            status, _ = _raw(port, "POST", f"/v1/{P}/datasets?datasetId={ds_id.replace(chr(0), '%00')}", b"{}",
                             {"Content-Type": "application/json"})
            results.append((f"datasetId={ds_id[:30]!r}", status))
        for path in [f"/v1/{P}/datasets/../../../../etc/passwd", f"/v1/{P}/datasets/%2e%2e/%2e%2e/{evil}",
                     f"/v1/{store}/../../{evil}/dicomStores", f"/v1/{store}/dicomWeb/studies/..%2F..%2F{evil}",
                     f"/v1/{store}/dicomWeb/studies/../../../../{evil}/series", f"/logs/../../{evil}",
                     f"/v1/{store}/dicomWeb/studies/1.2.3/series/1.2/instances/..%2f..%2f{evil}",
                     f"/emulator/wait/..%2F..%2F{evil}", f"/bigquery/v2/projects/test-project/datasets/..%2F{evil}",
                     f"/bigquery/v2/projects/..%2F..%2F{evil}/datasets"]:
            status, _ = _raw(port, "GET", path)
            results.append((f"GET {path[-40:]}", status))
        for bq_ds in [f"../{evil}", f"..%2F{evil}", ".", "..", f"{evil}/x"]:
            status, _ = _raw(port, "POST", "/bigquery/v2/projects/test-project/datasets",
                             json.dumps({"datasetReference": {"projectId": "test-project", "datasetId": bq_ds}}).encode(),
                             {"Content-Type": "application/json"})
            results.append((f"bq datasetId={bq_ds!r}", status))
        # an export to a table whose name tries to escape
        for uri in [f"bq://test-project.exports.../../{evil}", f"bq://test-project.../{evil}.t",
                    f"bq://..%2F{evil}.exports.t"]:
            status, _ = _raw(port, "POST", f"/v1/{store}:export",
                             json.dumps({"bigqueryDestination": {"tableUri": uri}}).encode(),
                             {"Content-Type": "application/json"})
            results.append((f"export {uri[-30:]}", status))

        # -- UIDs that look like paths, inside real DICOM files ------------------------------------------
        src = dicom_files.storable()[0]
        for uid in [f"../../../{evil}", f"..\\..\\{evil}", f"1.2.3/../../{evil}", "1.2.3\x00" + evil, "a" * 300]:
            f = tmp_path / f"{unique('uid')}.dcm"
            ds = pydicom.dcmread(src)
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.save_as(f, enforce_file_format=False)
            body, h = _multipart([f.read_bytes()])
            status, resp = _raw(port, "POST", f"/v1/{store}/dicomWeb/studies", body, h)
            results.append((f"STOW uid={uid[:20]!r}", status))

        # -- malformed and oversized STOW bodies --------------------------------------------------------
        good = dicom_files.with_uids(src, tmp_path / "good.dcm").read_bytes()
        stow = f"/v1/{store}/dicomWeb/studies"
        cases = {
            "no content-type": (good, {}),
            "wrong boundary": (_multipart([good], "one")[0], _multipart([good], "two")[1]),
            "no closing delimiter": _multipart([good], close=False),
            "empty multipart": (b"--b0undary--\r\n", _multipart([])[1]),
            "truncated part": (_multipart([good])[0][:200], _multipart([good])[1]),
            "not DICOM": _multipart([b"hello" * 100]),
            "huge part header": (b"--b0undary\r\n" + b"X-Junk: " + b"a" * 100_000 + b"\r\n\r\n" + good
                                 + b"\r\n--b0undary--\r\n", _multipart([])[1]),
            "boundary only garbage": (os.urandom(4096), _multipart([])[1]),
            "too many parts": _multipart([b"x"] * 10_001),
        }
        for name, (body, h) in cases.items():
            status, _ = _raw(port, "POST", stow, body, h)
            results.append((f"STOW {name}", status))
        # oversized: Content-Length beyond the limit, checked before the body is read
        status, _ = _raw(port, "POST", stow, b"", {**_multipart([])[1], "Content-Length": str(600 * 1024 * 1024)})
        results.append(("STOW Content-Length 600 MiB", status))

        healthy = _raw(port, "GET", "/healthz")[0] == 200

        # -- concurrent STOW of one instance ------------------------------------------------------------
        k = SIZES["concurrent_stow"]
        same = dicom_files.with_uids(src, tmp_path / "same.dcm")
        sop = pydicom.dcmread(same, stop_before_pixels=True).SOPInstanceUID
        with ThreadPoolExecutor(k) as ex:
            statuses = list(ex.map(lambda _: api.stow(store, [same]).status_code, range(k)))
        found = api.get(f"{store}/dicomWeb/instances", params={"SOPInstanceUID": sop}).json()

        after = _snapshot(tmp_path, data_dir)
        outside = sorted(after - before - {str(tmp_path / "same.dcm"), str(tmp_path / "good.dcm")})
        outside = [x for x in outside if not x.endswith(".dcm")]
        named_evil = [str(p) for p in Path("/").glob("tmp/*") if evil in p.name] + \
                     [str(p) for p in sandbox.rglob("*") if evil in p.name]
        five_xx = [(c, s) for c, s in results if s >= 500]
        accepted = [(c, s) for c, s in results if s < 400]
        report("emulator_hardening", hostile_requests=len(results), answered_4xx=sum(1 for _, s in results if 400 <= s < 500),
               five_xx=len(five_xx), accepted=len(accepted), new_files_outside_data_dir=len(outside) + len(named_evil),
               concurrent_stow=k, concurrent_stow_statuses=dict(__import__("collections").Counter(statuses)),
               instances_stored=len(found), still_serving=healthy)
        assert five_xx == [], five_xx
        assert accepted == [], accepted
        assert outside == [] and named_evil == [], (outside, named_evil)
        assert healthy and _raw(port, "GET", "/healthz")[0] == 200
        assert all(s in (200, 409) for s in statuses) and statuses.count(200) >= 1, statuses
        assert len(found) == 1
    finally:
        hc.stop()
