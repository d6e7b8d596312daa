"""DICOMweb of the healthcare emulator (STOW-RS, QIDO-RS, WADO-RS, delete), over a real socket.

The emulator's app runs in this process (module fixture `emulator`) so that tests can also check
its database rows and the store notifications it would publish; everything else goes over HTTP
to `emulator.root` (`http://127.0.0.1:PORT/v1/`), each test in a fresh DICOM store.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pydicom.data
import pytest
import requests
from pydicom.uid import generate_uid
from werkzeug.serving import make_server

from healthcare_emulator.server import create_app
from tests.support.hcapi import HC

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
DCM = "application/dicom"
T = {  # tags used in assertions
    "RetrieveURL": "00081190", "FailedSOPSequence": "00081198", "ReferencedSOPSequence": "00081199",
    "ReferencedSOPClassUID": "00081150", "ReferencedSOPInstanceUID": "00081155", "FailureReason": "00081197",
    "StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016", "PatientID": "00100020", "PatientName": "00100010", "StudyDate": "00080020",
    "Modality": "00080060", "ModalitiesInStudy": "00080061", "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208", "NumberOfSeriesRelatedInstances": "00201209",
    "StudyDescription": "00081030", "InstanceNumber": "00200013", "Rows": "00280010",
    "PixelData": "7FE00010", "AccessionNumber": "00080050", "SeriesDescription": "0008103E",
}


def read(name: str) -> bytes:
    return (TEST_FILES / name).read_bytes()


def uids(name: str) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID


def value(obj: dict, tag_name: str):
    v = obj.get(T.get(tag_name, tag_name), {}).get("Value")
    return v[0] if v else None


def variant(name: str, **changes) -> bytes:
    """A copy of a test file with new UIDs (unless given) and the given attribute changes."""
    ds = pydicom.dcmread(TEST_FILES / name)
    changes.setdefault("SOPInstanceUID", generate_uid())
    with warnings.catch_warnings():  # some variants are invalid on purpose
        warnings.simplefilter("ignore")
        for keyword, v in changes.items():
            if v is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, v)
    if "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[bytes], boundary: str = "b0undary-x", *, part_headers: bool = True,
              preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = io.BytesIO()
    out.write(preamble)
    for i, p in enumerate(parts):
        out.write(b"\r\n" if i or preamble else b"")
        out.write(f"--{boundary}\r\n".encode())
        if part_headers:
            out.write(b"Content-Type: application/dicom\r\n")
        out.write(b"\r\n")
        out.write(p)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    out.write(epilogue)
    return out.getvalue()


def parse_multipart(resp: requests.Response) -> list[tuple[str, bytes]]:
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = re.search(r'boundary="?([^";]+)"?', ctype).group(1).encode()
    body = resp.content
    out = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        out.append((headers.get("Content-Type", ""), content[:-2]))
    return out


# ------------------------------------------------------------------------------------------------
# harness: the emulator's WSGI app in this process, on a real socket (so tests can look at its state
# and at the notifications it would send)
# ------------------------------------------------------------------------------------------------

class Emulator:
    def __init__(self, app, url: str):
        self.app, self.url, self.state = app, url, app.state
        self.root = f"{url}/v1/"
        self.api = HC(url)
        self.notifications: list[tuple[str, str, dict]] = []
        self.fail_notify = False
        app.notify = self._notify  # record what the server would publish (and fail on demand)

    def _notify(self, store: str, action: str, instance: dict) -> None:
        self.notifications.append((store, action, instance))
        if self.fail_notify:
            raise RuntimeError("pubsub down")

    def new_store(self) -> "Store":
        return Store(self, self.api.store())


class Store:
    def __init__(self, emulator: Emulator, name: str):
        self.emulator, self.name = emulator, name
        self.url = f"{emulator.root}{name}/dicomWeb"

    def stow(self, parts: list[bytes] | bytes, study: str | None = None, **kw) -> requests.Response:
        url = f"{self.url}/studies" + (f"/{study}" if study else "")
        if isinstance(parts, bytes):
            return requests.post(url, data=parts, headers={"Content-Type": DCM}, timeout=30)
        boundary = kw.pop("boundary", "b0undary-x")
        ctype = kw.pop("content_type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        return requests.post(url, data=multipart(parts, boundary, **kw), headers={"Content-Type": ctype},
                             timeout=30)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.url}/{path}", timeout=30, **kw)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(f"{self.url}/{path}", timeout=30)

    def rows(self) -> int:
        return self.emulator.state.db().execute("SELECT COUNT(*) FROM instances WHERE store = ?",
                                                (self.name,)).fetchone()[0]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    app = create_app(tmp_path_factory.mktemp("hc-data"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Emulator(app, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def store(emulator) -> Store:
    return emulator.new_store()


def error_of(resp: requests.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ------------------------------------------------------------------------------------------------
# STOW-RS
# ------------------------------------------------------------------------------------------------

def test_stow_single_instance_application_dicom(store, emulator):
    study, series, sop, sop_class = uids("CT_small.dcm")
    before = len(emulator.notifications)
    resp = store.stow(read("CT_small.dcm"))
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/dicom+json"
    body = resp.json()
    assert value(body, "RetrieveURL") == f"{store.url}/studies/{study}"
    assert "00081198" not in body
    [item] = body[T["ReferencedSOPSequence"]]["Value"]
    assert value(item, "ReferencedSOPClassUID") == sop_class
    assert value(item, "ReferencedSOPInstanceUID") == sop
    assert value(item, "RetrieveURL") == f"{store.url}/studies/{study}/series/{series}/instances/{sop}"
    new = emulator.notifications[before:]
    assert [(s, a) for s, a, _ in new] == [(store.name, "StoreInstances")]
    inst = new[0][2]
    assert {k: inst[k] for k in ("study", "series", "sop", "sop_class", "modality")} == {
        "study": study, "series": series, "sop": sop, "sop_class": sop_class, "modality": "CT"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", inst["stored_at"])


@pytest.mark.parametrize("ctype", [
    'multipart/related; type="application/dicom"; boundary={b}',
    "multipart/related; type=application/dicom; boundary={b}",
    'multipart/related; boundary="{b}"; type="application/dicom"',
    "Multipart/Related; boundary={b}",
])
def test_stow_multipart_many_parts(store, ctype):
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"]
    resp = store.stow([read(n) for n in names], content_type=ctype.format(b="XyZ-123"), boundary="XyZ-123")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    refs = body[T["ReferencedSOPSequence"]]["Value"]
    assert [value(r, "ReferencedSOPInstanceUID") for r in refs] == [uids(n)[2] for n in names]
    assert [value(r, "ReferencedSOPClassUID") for r in refs] == [uids(n)[3] for n in names]
    assert T["RetrieveURL"] not in body  # several studies: no single study URL
    assert store.rows() == 5


def test_stow_multipart_tolerates_preamble_epilogue_padding_and_headerless_parts(store):
    data = [read("CT_small.dcm"), read("MR_small.dcm")]
    body = multipart(data, "bnd", preamble=b"this is a preamble", epilogue=b"\r\nepilogue\r\n",
                     part_headers=False).replace(b"--bnd\r\n", b"--bnd \t\r\n", 1)
    resp = requests.post(f"{store.url}/studies", data=body,
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=bnd'})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()[T["ReferencedSOPSequence"]]["Value"]) == 2


def test_stow_part_containing_boundary_prefix_is_not_split(store):
    # "--bnd" followed by something else than CRLF or "--" inside a part is content, not a delimiter.
    dcm = variant("CT_small.dcm", StudyDescription="x\r\n--bndX not a delimiter")
    resp = store.stow([dcm], boundary="bnd")
    assert resp.status_code == 200, resp.text
    [(_, got)] = parse_multipart(store.get(
        "studies/{}/series/{}/instances/{}".format(*uids_of(dcm)[:3])))
    assert got == dcm


def uids_of(data: bytes) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID


def test_stow_of_a_stored_sop_instance_uid_is_refused_even_with_the_same_bytes(store, emulator):
    """The real API stores an instance again only after it was deleted: a second STOW fails (409)."""
    before = len(emulator.notifications)
    _, _, sop, sop_class = uids("MR_small.dcm")
    first = store.stow([read("MR_small.dcm")])
    assert first.status_code == 200
    second = store.stow(read("MR_small.dcm"))
    assert second.status_code == 409
    [item] = second.json()[T["FailedSOPSequence"]]["Value"]
    assert value(item, "FailureReason") == 0x0110
    assert (value(item, "ReferencedSOPInstanceUID"), value(item, "ReferencedSOPClassUID")) == (sop, sop_class)
    assert "already exists" in value(item, "00090097")
    assert store.rows() == 1
    assert len(emulator.notifications) - before == 1  # nothing notified for the refused copy
    # the same instance twice in one request: the first copy is stored, the second refused (202)
    ct = read("CT_small.dcm")
    both = store.stow([ct, ct])
    assert both.status_code == 202
    assert len(both.json()[T["ReferencedSOPSequence"]]["Value"]) == 1
    assert len(both.json()[T["FailedSOPSequence"]]["Value"]) == 1
    # deleted first, it can be stored again
    study, series, _, _ = uids("MR_small.dcm")
    assert store.delete(f"studies/{study}/series/{series}/instances/{sop}").status_code == 200
    assert store.stow([read("MR_small.dcm")]).status_code == 200


def test_stow_same_uid_different_content_conflicts(store):
    _, _, sop, sop_class = uids("MR_small.dcm")
    assert uids("MR_small_implicit.dcm")[2] == sop  # same UIDs, different encoding
    assert store.stow([read("MR_small.dcm")]).status_code == 200
    resp = store.stow([read("MR_small_implicit.dcm")])
    assert resp.status_code == 409
    [item] = resp.json()[T["FailedSOPSequence"]]["Value"]
    assert value(item, "FailureReason") == 0x0110
    assert value(item, "ReferencedSOPInstanceUID") == sop
    assert value(item, "ReferencedSOPClassUID") == sop_class
    assert "different content" in value(item, "00090097")
    # one conflict + one new instance: partial success
    resp = store.stow([read("MR_small_implicit.dcm"), read("CT_small.dcm")])
    assert resp.status_code == 202
    body = resp.json()
    assert len(body[T["FailedSOPSequence"]]["Value"]) == 1
    assert value(body[T["ReferencedSOPSequence"]]["Value"][0], "ReferencedSOPInstanceUID") == uids("CT_small.dcm")[2]
    # the stored bytes are still the first ones
    study, series, _, _ = uids("MR_small.dcm")
    [(_, got)] = parse_multipart(store.get(f"studies/{study}/series/{series}/instances/{sop}"))
    assert got == read("MR_small.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_stow_non_dicom_and_invalid_parts(store):
    bad_uid = variant("CT_small.dcm", SeriesInstanceUID="1.2.abc")
    long_uid = variant("CT_small.dcm", SOPInstanceUID="1." + "2" * 70)
    no_series = variant("CT_small.dcm", SeriesInstanceUID=None)
    truncated = read("CT_small.dcm")[:100]
    resp = store.stow([b"hello, not DICOM", read("rtplan.dcm"), bad_uid, long_uid, no_series, truncated,
                       read("no_meta.dcm")])
    assert resp.status_code == 202, resp.text
    body = resp.json()
    failed = body[T["FailedSOPSequence"]]["Value"]
    assert [value(f, "FailureReason") for f in failed] == [0xC000] * 6
    details = [value(f, "00090097") for f in failed]
    assert "not a valid DICOM" in details[0]
    assert "invalid SeriesInstanceUID" in details[1]
    assert value(failed[1], "ReferencedSOPInstanceUID") == uids_of(bad_uid)[2]
    assert "invalid SOPInstanceUID" in details[2] and T["ReferencedSOPInstanceUID"] not in failed[2]
    assert "missing SeriesInstanceUID" in details[3]
    assert "Part 6" in details[4] and "Part 7" in details[5]
    [ok] = body[T["ReferencedSOPSequence"]]["Value"]
    assert value(ok, "ReferencedSOPInstanceUID") == uids("rtplan.dcm")[2]
    assert store.rows() == 1
    # all parts failing: 409
    resp = store.stow([b"junk"])
    assert resp.status_code == 409
    assert store.stow(b"\x00" * 300).status_code == 409  # single-part application/dicom too


def test_stow_study_uid_mismatch(store):
    study = uids("CT_small.dcm")[0]
    resp = store.stow([read("CT_small.dcm"), read("MR_small.dcm")], study=study)
    assert resp.status_code == 202
    body = resp.json()
    assert value(body, "RetrieveURL") == f"{store.url}/studies/{study}"
    [failed] = body[T["FailedSOPSequence"]]["Value"]
    assert value(failed, "FailureReason") == 0xA900
    assert value(failed, "ReferencedSOPInstanceUID") == uids("MR_small.dcm")[2]
    assert "does not match" in value(failed, "00090097")
    assert store.stow([read("MR_small.dcm")], study="1.2.3").status_code == 409
    assert store.rows() == 1


@pytest.mark.parametrize("ctype, body, message", [
    ('multipart/related; type="application/dicom"', b"--x\r\n\r\nabc\r\n--x--", "boundary"),
    ('multipart/related; type="application/dicom"; boundary=nope', b"--x\r\n\r\nabc\r\n--x--", "no boundary"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\n\r\nabc", "closing delimiter"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\n\r\nabc\r\n--x\r\n\r\ndef",
     "part 2"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\nContent-Type: application/dicom",
     "truncated"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x\r\nnot a header\r\n\r\nabc\r\n--x--",
     "header"),
    ('multipart/related; type="application/dicom"; boundary=x', b"", "Empty"),
    ('multipart/related; type="application/dicom"; boundary=x', b"--x--\r\n", "no parts"),
    ("multipart/related; boundary=" + "b" * 71, b"--x--", "1 to 70"),
    ("application/dicom", b"", "Empty"),
])
def test_stow_malformed_multipart_is_400(store, ctype, body, message):
    resp = requests.post(f"{store.url}/studies", data=body, headers={"Content-Type": ctype})
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["status"] == "INVALID_ARGUMENT" and err["code"] == 400
    assert message in err["message"]
    assert store.rows() == 0


def test_stow_unsupported_media_types(store):
    resp = requests.post(f"{store.url}/studies", data=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 415
    resp = requests.post(f"{store.url}/studies", data=b"x", headers={})
    assert resp.status_code == 415
    resp = requests.post(f"{store.url}/studies", data=b"--x--",
                         headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=x'})
    assert resp.status_code == 501 and error_of(resp)["status"] == "UNIMPLEMENTED"
    resp = requests.post(f"{store.url}/studies", data=b"--x--",
                         headers={"Content-Type": 'multipart/related; type="image/jpeg"; boundary=x'})
    assert resp.status_code == 415
    # a part of another type inside an application/dicom request fails alone
    body = (b"--x\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\r\n--x\r\nContent-Type: application/dicom\r\n\r\n"
            + read("CT_small.dcm") + b"\r\n--x--")
    resp = requests.post(f"{store.url}/studies", data=body,
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert resp.status_code == 202
    [failed] = resp.json()[T["FailedSOPSequence"]]["Value"]
    assert "image/jpeg" in value(failed, "00090097")


def test_stow_limits(store, emulator):
    # A declared body over 512 MiB is refused before it is read.
    u = urlsplit(store.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", f"{u.path}/studies")
    conn.putheader("Content-Type", 'multipart/related; type="application/dicom"; boundary=x')
    conn.putheader("Content-Length", str(600 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert json.loads(resp.read())["error"]["status"] == "INVALID_ARGUMENT"
    conn.close()
    # Too many parts.
    body = b"".join(b"--x\r\n\r\n\r\n" for _ in range(10_001)) + b"--x--"
    resp = requests.post(f"{store.url}/studies", data=body,
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert resp.status_code == 413 and "Too many parts" in error_of(resp)["message"]
    assert store.rows() == 0


def test_stow_chunked_body(store):
    data = multipart([read("CT_small.dcm"), read("MR_small.dcm")], "chunky")
    chunks = (data[i:i + 4096] for i in range(0, len(data), 4096))
    resp = requests.post(f"{store.url}/studies", data=chunks,
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=chunky'})
    assert resp.status_code == 200, resp.text
    assert store.rows() == 2


def test_stow_survives_a_failing_notifier(store, emulator):
    emulator.fail_notify = True
    try:
        resp = store.stow([read("CT_small.dcm")])
    finally:
        emulator.fail_notify = False
    assert resp.status_code == 200
    assert store.rows() == 1


def test_concurrent_stow_of_the_same_instance(store, emulator):
    data = read("CT_small.dcm")
    before = len(emulator.notifications)
    barrier = threading.Barrier(8)

    def post(_):
        barrier.wait()
        return store.stow([data])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    assert sorted(r.status_code for r in results) == [200] + [409] * 7  # exactly one is stored
    assert store.rows() == 1
    found = store.get("instances", params={"SOPInstanceUID": uids("CT_small.dcm")[2]}).json()
    assert len(found) == 1
    assert len([n for n in emulator.notifications[before:] if n[0] == store.name]) == 1


# ------------------------------------------------------------------------------------------------
# QIDO-RS
# ------------------------------------------------------------------------------------------------

S1 = "1.2.826.0.1.3680043.10.1.1"          # a generated study: 2 series (CT x3, SR x1)
S1_CT = S1 + ".1"
S1_SR = S1 + ".2"


@pytest.fixture(scope="module")
def qido(emulator) -> Store:
    store = emulator.new_store()
    files = [read(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm",
                               "liver_1frame.dcm", "SC_rgb_rle_2frame.dcm")]
    files += [variant("CT_small.dcm", StudyInstanceUID=S1, SeriesInstanceUID=S1_CT,
                      SOPInstanceUID=f"{S1_CT}.{n}", InstanceNumber=n, PatientID="PAT-9", StudyDate="20200615",
                      PatientName="Doe^Jane", AccessionNumber="ACC-1", StudyDescription="Chest [CT]")
              for n in (1, 2, 3)]
    files += [variant("test-SR.dcm", StudyInstanceUID=S1, SeriesInstanceUID=S1_SR, SOPInstanceUID=f"{S1_SR}.1",
                      PatientID="PAT-9", StudyDate="20200615", PatientName="Doe^Jane", AccessionNumber="ACC-1")]
    resp = store.stow(files)
    assert resp.status_code == 200, resp.text
    return store


def studies(store: Store, **params) -> list[dict]:
    resp = store.get("studies", params=params)
    if resp.status_code == 204:
        assert resp.content == b""
        return []
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/dicom+json"
    return resp.json()


def test_qido_studies_all_with_counts_and_defaults(qido):
    found = studies(qido, includefield="NumberOfStudyRelatedSeries,00201208")
    assert [value(s, "StudyInstanceUID") for s in found] == [
        uids(n)[0] for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm",
                             "liver_1frame.dcm", "SC_rgb_rle_2frame.dcm")] + [S1]
    s1 = found[-1]
    assert value(s1, "NumberOfStudyRelatedSeries") == 2
    assert value(s1, "NumberOfStudyRelatedInstances") == 4
    assert s1[T["ModalitiesInStudy"]]["Value"] == ["CT", "SR"]
    assert value(s1, "RetrieveURL") == f"{qido.url}/studies/{S1}"
    assert s1[T["PatientName"]] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert value(s1, "PatientID") == "PAT-9" and value(s1, "StudyDate") == "20200615"
    assert T["StudyDescription"] not in s1  # not a default attribute
    assert T["SOPInstanceUID"] not in s1 and T["Modality"] not in s1
    assert list(s1) == sorted(s1)


@pytest.mark.parametrize("params, expected", [
    ({"PatientID": "PAT-9"}, [S1]),
    ({"00100020": "PAT-9"}, [S1]),
    ({"PatientID": "PAT-*"}, [S1]),
    ({"PatientID": "pat-9"}, []),                        # strings match case-sensitively
    ({"PatientName": "doe^jane"}, [S1]),                 # names do not
    ({"PatientName": "Doe*"}, [S1]),
    ({"PatientName": "D?e^J*", "fuzzymatching": "true"}, [S1]),
    ({"PatientName": "Doe"}, []),
    ({"StudyDate": "20200615"}, [S1]),
    ({"StudyDate": "20200101-20201231"}, [S1]),
    ({"StudyDate": "20200616-"}, []),
    ({"StudyDate": "-20200615", "PatientID": "PAT-9"}, [S1]),
    ({"AccessionNumber": "ACC-1"}, [S1]),
    ({"StudyInstanceUID": S1}, [S1]),
    ({"StudyInstanceUID": f"{S1},1.2.3"}, [S1]),
    ({"ModalitiesInStudy": "SR", "PatientID": "PAT-9"}, [S1]),
    ({"Modality": "CT", "PatientID": "PAT-9"}, [S1]),
    ({"Modality": "MR", "PatientID": "PAT-9"}, []),
    ({"StudyDescription": "Chest [CT]"}, [S1]),
    ({"StudyDescription": "Chest [C*"}, [S1]),
    ({"PatientID": ""}, None),                           # universal matching: everything
])
def test_qido_study_matching(qido, params, expected):
    found = [value(s, "StudyInstanceUID") for s in studies(qido, **params)]
    if expected is None:
        assert len(found) == 8
    else:
        assert found == expected


def test_qido_study_dates_and_wildcards_over_the_corpus(qido):
    assert {value(s, "StudyDate") for s in studies(qido, StudyDate="20040826")} == {"20040826"}
    in_2003 = studies(qido, StudyDate="20030101-20031231")
    assert sorted(value(s, "StudyDate") for s in in_2003) == ["20030417", "20030716", "20030805"]
    assert len(studies(qido, PatientName="CompressedSamples^*")) == 3  # CT1, MR1, NM1
    assert len(studies(qido, PatientName="CompressedSamples^?R1")) == 1


def test_qido_limit_offset_and_warning(qido):
    all_uids = [value(s, "StudyInstanceUID") for s in studies(qido)]
    resp = qido.get("studies", params={"limit": 3, "offset": 2})
    assert resp.status_code == 200
    assert [value(s, "StudyInstanceUID") for s in resp.json()] == all_uids[2:5]
    assert "additional results" in resp.headers["Warning"]
    resp = qido.get("studies", params={"limit": 3, "offset": 6})
    assert [value(s, "StudyInstanceUID") for s in resp.json()] == all_uids[6:]
    assert "Warning" not in resp.headers
    assert qido.get("studies", params={"offset": 8}).status_code == 204
    resp = qido.get("studies", params={"limit": 6000})
    assert len(resp.json()) == 8 and "maximum of 5000" in resp.headers["Warning"]
    paged = []
    for offset in range(0, 12, 2):
        resp = qido.get("instances", params={"limit": 2, "offset": offset})
        assert resp.status_code == 200
        paged += [value(s, "SOPInstanceUID") for s in resp.json()]
    assert len(paged) == 11 and len(set(paged)) == 11


def test_qido_includefield(qido):
    [s1] = studies(qido, StudyInstanceUID=S1, includefield="StudyDescription")
    assert value(s1, "StudyDescription") == "Chest [CT]"
    [s1] = studies(qido, StudyInstanceUID=S1, includefield="00081030,PatientSex")
    assert value(s1, "StudyDescription") == "Chest [CT]"
    [s1] = studies(qido, StudyInstanceUID=S1, includefield="all")
    assert value(s1, "StudyDescription") == "Chest [CT]"
    assert T["Modality"] not in s1 and T["SOPInstanceUID"] not in s1  # lower levels never
    resp = qido.get(f"studies/{S1}/series/{S1_CT}/instances", params={"includefield": "all"})
    inst = resp.json()[0]
    assert value(inst, "Rows") == 128 and "00080008" in inst  # ImageType only with all
    assert value(inst, "00083002") == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("path, params, message", [
    ("studies", {"NoSuchKeyword": "x"}, "Unknown DICOM attribute"),
    ("studies", {"BodyPartThickness": "x"}, "Unsupported search parameter"),
    ("studies", {"SOPInstanceUID": "1.2"}, "instance-level"),
    ("studies", {"SeriesInstanceUID": "1.2"}, "series-level"),
    ("studies", {"StudyDate": "2020-01-01"}, "Invalid date"),
    ("studies", {"StudyDate": "20200101-2021"}, "Invalid date range"),
    ("studies", {"StudyInstanceUID": "1.2.x"}, "Invalid UID"),
    ("studies", {"limit": "-1"}, "non-negative"),
    ("studies", {"offset": "ten"}, "non-negative"),
    ("studies", {"includefield": "Nonsense"}, "Unknown DICOM attribute"),
    ("studies", {"fuzzymatching": "maybe"}, "fuzzymatching"),
    ("series", {"SOPInstanceUID": "1.2"}, "instance-level"),
    ("instances", {"InstanceNumber": "one"}, "integer"),
])
def test_qido_bad_queries_are_400(qido, path, params, message):
    resp = qido.get(path, params=params)
    assert resp.status_code == 400, resp.text
    err = error_of(resp)
    assert err["status"] == "INVALID_ARGUMENT" and message in err["message"]


def test_qido_repeated_keys(qido):
    assert qido.get("studies", params=[("PatientID", "a"), ("PatientID", "b")]).status_code == 400
    found = studies(qido, **{"StudyInstanceUID": [S1, uids("CT_small.dcm")[0]]})
    assert {value(s, "StudyInstanceUID") for s in found} == {S1, uids("CT_small.dcm")[0]}


def test_qido_series(qido):
    resp = qido.get(f"studies/{S1}/series", params={"includefield": "NumberOfSeriesRelatedInstances"})
    assert resp.status_code == 200
    found = resp.json()
    assert [value(s, "SeriesInstanceUID") for s in found] == [S1_CT, S1_SR]
    ct = found[0]
    assert value(ct, "Modality") == "CT" and value(ct, "NumberOfSeriesRelatedInstances") == 3
    assert value(ct, "StudyInstanceUID") == S1
    assert value(ct, "RetrieveURL") == f"{qido.url}/studies/{S1}/series/{S1_CT}"
    assert T["PatientID"] not in ct  # study attributes only in store-wide (relational) searches
    sr = qido.get(f"studies/{S1}/series", params={"Modality": "SR"}).json()
    assert [value(s, "SeriesInstanceUID") for s in sr] == [S1_SR]
    assert qido.get(f"studies/{S1}/series", params={"SeriesNumber": 999}).status_code == 204
    # store-wide
    everything = qido.get("series").json()
    assert len(everything) == 9
    cts = qido.get("series", params={"Modality": "CT"}).json()
    assert {value(s, "SeriesInstanceUID") for s in cts} == {uids("CT_small.dcm")[1], S1_CT}
    assert all(value(s, "PatientID") for s in cts)
    [sr] = qido.get("series", params={"PatientID": "PAT-9", "Modality": "SR"}).json()
    assert value(sr, "SeriesInstanceUID") == S1_SR
    assert qido.get("studies/1.2.3.4/series").status_code == 204


def test_qido_instances(qido):
    resp = qido.get(f"studies/{S1}/series/{S1_CT}/instances")
    found = resp.json()
    assert [value(i, "SOPInstanceUID") for i in found] == [f"{S1_CT}.{n}" for n in (1, 2, 3)]
    first = found[0]
    assert value(first, "InstanceNumber") == 1 and value(first, "Rows") == 128
    assert value(first, "SOPClassUID") == uids("CT_small.dcm")[3]
    assert value(first, "StudyInstanceUID") == S1 and value(first, "SeriesInstanceUID") == S1_CT
    assert value(first, "RetrieveURL") == f"{qido.url}/studies/{S1}/series/{S1_CT}/instances/{S1_CT}.1"
    assert T["Modality"] not in first
    assert [value(i, "SOPInstanceUID") for i in qido.get(
        f"studies/{S1}/series/{S1_CT}/instances", params={"InstanceNumber": 2}).json()] == [f"{S1_CT}.2"]
    # study-wide: series attributes come along
    in_study = qido.get(f"studies/{S1}/instances").json()
    assert len(in_study) == 4 and {value(i, "Modality") for i in in_study} == {"CT", "SR"}
    sr = qido.get(f"studies/{S1}/instances", params={"Modality": "SR"}).json()
    assert [value(i, "SOPInstanceUID") for i in sr] == [f"{S1_SR}.1"]
    # store-wide
    sop = uids("rtdose.dcm")[2]
    [one] = qido.get("instances", params={"SOPInstanceUID": sop}).json()
    assert value(one, "PatientID") == "id11111" and value(one, "Modality") == "RTDOSE"
    assert len(qido.get("instances", params={"StudyDate": "20200615"}).json()) == 4
    assert value(qido.get("instances", params={"SOPInstanceUID": uids("SC_rgb_rle_2frame.dcm")[2]}).json()[0],
                 "00280008") == 2  # NumberOfFrames
    assert qido.get("instances", params={"SOPClassUID": "1.2.3"}).status_code == 204


# ------------------------------------------------------------------------------------------------
# WADO-RS
# ------------------------------------------------------------------------------------------------

def test_retrieve_instance_returns_stored_bytes(qido):
    for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm"):
        study, series, sop, _ = uids(name)
        resp = qido.get(f"studies/{study}/series/{series}/instances/{sop}")
        assert resp.status_code == 200
        assert 'type="application/dicom"' in resp.headers["Content-Type"]
        [(ctype, data)] = parse_multipart(resp)
        assert data == read(name)
        ts = pydicom.dcmread(TEST_FILES / name).file_meta.TransferSyntaxUID
        assert ctype == f"application/dicom; transfer-syntax={ts}"
    study, series, sop, _ = uids("JPEG2000.dcm")
    path = f"studies/{study}/series/{series}/instances/{sop}"
    any_ts = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    assert parse_multipart(qido.get(path, headers=any_ts))[0][1] == read("JPEG2000.dcm")
    single = qido.get(path, headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert single.status_code == 200 and single.content == read("JPEG2000.dcm")
    assert single.headers["Content-Type"].startswith("application/dicom")
    not_transcoded = qido.get(path, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'})
    assert not_transcoded.status_code == 406 and "does not transcode" in error_of(not_transcoded)["message"]
    assert qido.get(path, headers={"Accept": "image/png"}).status_code == 406


def test_retrieve_series_and_study(qido):
    parts = parse_multipart(qido.get(f"studies/{S1}/series/{S1_CT}"))
    assert [uids_of(d)[2] for _, d in parts] == [f"{S1_CT}.{n}" for n in (1, 2, 3)]
    parts = parse_multipart(qido.get(f"studies/{S1}"))
    assert len(parts) == 4
    assert qido.get(f"studies/{S1}", headers={"Accept": "application/dicom"}).status_code == 406


def test_retrieve_unknown_is_404(qido):
    study, series, sop, _ = uids("CT_small.dcm")
    for path in ("studies/1.2.3", f"studies/{study}/series/1.2.3", f"studies/{study}/series/{series}/instances/1.2.3",
                 f"studies/{study}/series/{series}/instances/1.2.3/metadata", "studies/1.2.3/metadata",
                 f"studies/1.2.3/series/{series}/instances/{sop}"):
        resp = qido.get(path)
        assert resp.status_code == 404, path
        assert error_of(resp)["status"] == "NOT_FOUND"


def test_metadata_without_pixel_data(qido):
    study, series, sop, sop_class = uids("CT_small.dcm")
    resp = qido.get(f"studies/{study}/series/{series}/instances/{sop}/metadata")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/dicom+json"
    [meta] = resp.json()
    assert value(meta, "SOPInstanceUID") == sop and value(meta, "SOPClassUID") == sop_class
    assert meta[T["PatientName"]]["Value"] == [{"Alphabetic": "CompressedSamples^CT1"}]
    pixel = meta[T["PixelData"]]
    assert "Value" not in pixel and "InlineBinary" not in pixel
    assert pixel["BulkDataURI"] == f"{qido.url}/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    assert not any(k.startswith("0002") for k in meta)
    assert len(resp.content) < 20_000  # the 32 KiB of pixels are not in there
    # the bulk data behind the URI is the element's value
    bulk = requests.get(pixel["BulkDataURI"], timeout=30)
    [(ctype, data)] = parse_multipart(bulk)
    assert ctype == "application/octet-stream"
    assert data == pydicom.dcmread(TEST_FILES / "CT_small.dcm").PixelData
    raw = requests.get(pixel["BulkDataURI"], headers={"Accept": "application/octet-stream"}, timeout=30)
    assert raw.content == data
    # round trip through pydicom
    ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *a: b"")
    assert ds.Rows == 128


def test_metadata_series_and_study_level(qido):
    study_meta = qido.get(f"studies/{S1}/metadata").json()
    assert sorted(value(m, "SOPInstanceUID") for m in study_meta) == sorted(
        [f"{S1_CT}.{n}" for n in (1, 2, 3)] + [f"{S1_SR}.1"])
    series_meta = qido.get(f"studies/{S1}/series/{S1_SR}/metadata").json()
    assert len(series_meta) == 1 and value(series_meta[0], "Modality") == "SR"
    assert series_meta[0]["0040A730"]["vr"] == "SQ"  # ContentSequence kept, nested


def test_metadata_nested_bulk_data(store):
    # A sequence item with a large binary element: BulkDataURI carries the item path.
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    item = pydicom.Dataset()
    item.add_new(0x00420011, "OB", b"\x01" * 3000)  # EncapsulatedDocument
    item.add_new(0x00081030, "LO", "inner")
    ds.add_new(0x00400275, "SQ", pydicom.Sequence([pydicom.Dataset(), item]))  # RequestAttributesSequence
    buf = io.BytesIO()
    ds.save_as(buf)
    assert store.stow([buf.getvalue()]).status_code == 200
    study, series, sop, _ = uids("CT_small.dcm")
    [meta] = store.get(f"studies/{study}/series/{series}/instances/{sop}/metadata").json()
    seq = meta["00400275"]["Value"]
    assert seq[0] == {} and seq[1]["00081030"]["Value"] == ["inner"]
    uri = seq[1]["00420011"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/00400275/1/00420011")
    raw = requests.get(uri, headers={"Accept": "application/octet-stream"}, timeout=30)
    assert raw.status_code == 200 and raw.content == b"\x01" * 3000
    base = f"studies/{study}/series/{series}/instances/{sop}/bulkdata"
    assert store.get(f"{base}/00400275/5/00420011").status_code == 404
    assert store.get(f"{base}/7FE0001").status_code == 400
    assert store.get(f"{base}/00100010").status_code == 400  # not binary


def test_unimplemented_resources(qido):
    study, series, sop, _ = uids("CT_small.dcm")
    for path in (f"studies/{study}/series/{series}/instances/{sop}/frames/1",
                 f"studies/{study}/series/{series}/instances/{sop}/rendered", f"studies/{study}/thumbnail"):
        resp = qido.get(path)
        assert resp.status_code == 501 and error_of(resp)["status"] == "UNIMPLEMENTED"


# ------------------------------------------------------------------------------------------------
# delete
# ------------------------------------------------------------------------------------------------

def test_delete_at_each_level(store, emulator):
    s2 = "1.2.826.0.1.3680043.10.1.77"
    files = [variant("CT_small.dcm", StudyInstanceUID=s2, SeriesInstanceUID=f"{s2}.{se}",
                     SOPInstanceUID=f"{s2}.{se}.{n}") for se in (1, 2) for n in (1, 2)]
    files.append(read("MR_small.dcm"))
    assert store.stow(files).status_code == 200
    before = len(emulator.notifications)

    resp = store.delete(f"studies/{s2}/series/{s2}.1/instances/{s2}.1.1")
    assert resp.status_code == 200 and resp.json() == {}
    assert store.get(f"studies/{s2}/series/{s2}.1/instances/{s2}.1.1").status_code == 404
    assert store.delete(f"studies/{s2}/series/{s2}.1/instances/{s2}.1.1").status_code == 404
    assert store.delete(f"studies/{s2}/series/{s2}.2/instances/{s2}.1.2").status_code == 404  # wrong series
    assert store.rows() == 4

    assert store.delete(f"studies/{s2}/series/{s2}.2").status_code == 200
    assert store.get(f"studies/{s2}/series").json()[0][T["SeriesInstanceUID"]]["Value"] == [f"{s2}.1"]
    assert store.rows() == 2

    assert store.delete(f"studies/{s2}").status_code == 200
    assert store.delete(f"studies/{s2}").status_code == 404
    assert store.get(f"studies/{s2}/series").status_code == 204
    assert store.rows() == 1
    new = [(a, i["sop"]) for s, a, i in emulator.notifications[before:] if s == store.name]
    assert new == [("DeleteInstance", f"{s2}.1.1"), ("DeleteSeries", f"{s2}.2.1"), ("DeleteSeries", f"{s2}.2.2"),
                   ("DeleteStudy", f"{s2}.1.2")]
    # deleted files are gone from disk, others stay
    blobs = {r[0] for r in emulator.state.db().execute("SELECT blob FROM instances")}
    on_disk = {p.stem for p in emulator.state.blob_dir.rglob("*.dcm")}
    assert blobs <= on_disk
    for data in files[:4]:
        assert hashlib.sha256(data).hexdigest() not in on_disk


def test_delete_keeps_blobs_shared_with_another_store(emulator):
    a, b = emulator.new_store(), emulator.new_store()
    assert a.stow([read("rtdose.dcm")]).status_code == 200
    assert b.stow([read("rtdose.dcm")]).status_code == 200
    study, series, sop, _ = uids("rtdose.dcm")
    assert a.delete(f"studies/{study}").status_code == 200
    [(_, data)] = parse_multipart(b.get(f"studies/{study}/series/{series}/instances/{sop}"))
    assert data == read("rtdose.dcm")
    assert a.get(f"studies/{study}/series/{series}/instances/{sop}").status_code == 404
    # and storing it again in a works
    assert a.stow([read("rtdose.dcm")]).status_code == 200


# ------------------------------------------------------------------------------------------------
# hostile paths
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "studies/..", 400),
    ("GET", "studies/.", 400),
    ("GET", "studies/../series", 400),
    ("GET", "studies/1.2/series/../instances", 400),
    ("GET", "studies/1.2/series/..%2F..%2Fetc/instances", 400),
    ("GET", "studies/1.2/series/3.4/instances/..", 400),
    ("GET", "studies/1.2/series/3.4/instances/abc/metadata", 400),
    ("GET", "studies/" + "1" * 65, 400),
    ("GET", "studies/1.2%00", 400),
    ("DELETE", "studies/..", 400),
    ("DELETE", "studies/1.2/series/..", 400),
    ("POST", "studies/..", 400),
    ("POST", "studies/1.2.x", 400),
    ("GET", "studies/1.2/unknown", 404),
    ("GET", "patients", 404),
    ("DELETE", "studies", 405),
    ("PUT", "studies", 405),
    ("POST", "studies/1.2/series", 405),
    ("DELETE", "studies/1.2/metadata", 405),
    ("GET", "studies/1.2/series/3.4/instances/5.6/bulkdata/../../x", 400),
])
def test_hostile_paths(store, method, path, status):
    # http.client, not requests: urllib3 would remove the dot segments before sending.
    u = urlsplit(store.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, f"{u.path}/{path}", body=b"" if method in ("POST", "PUT") else None,
                     headers={"Content-Type": DCM})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == status, body
    assert "error" in json.loads(body)


# ------------------------------------------------------------------------------------------------
# a real DICOMweb client
# ------------------------------------------------------------------------------------------------

def test_dicomweb_client_round_trip(store):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=store.url)
    datasets = [pydicom.dcmread(TEST_FILES / n) for n in ("CT_small.dcm", "MR_small.dcm")]
    result = client.store_instances(datasets=datasets)
    assert len(result.ReferencedSOPSequence) == 2
    found = client.search_for_studies(search_filters={"PatientID": "1CT1"})
    assert [s["0020000D"]["Value"][0] for s in found] == [datasets[0].StudyInstanceUID]
    study, series, sop, _ = uids("MR_small.dcm")
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    assert client.search_for_series(study)[0]["0020000E"]["Value"] == [series]
    assert client.search_for_instances(study, series)[0]["00080018"]["Value"] == [sop]
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert meta["00080018"]["Value"] == [sop] and "BulkDataURI" in meta["7FE00010"]
    instance = client.retrieve_instance(study, series, sop)
    assert instance.SOPInstanceUID == sop
    assert instance.PixelData == datasets[1].PixelData
    client.delete_instance(study, series, sop)
    assert client.search_for_instances(study, series) == []
