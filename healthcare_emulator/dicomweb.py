"""DICOMweb (STOW-RS, QIDO-RS, WADO-RS, delete) of the emulated Cloud Healthcare API.

The server routes every `.../dicomStores/S/dicomWeb/{path}` request here through `handle()`.
Instances live in the `instances` table of `state.py` (one row per SOP Instance UID and store, with
`attrs` = the DICOM JSON of the attributes QIDO matches and returns) and their files are blobs named
by SHA-256, so nothing the client chooses ever becomes a file name.

Behaviour, and the choices made where Google's documentation is silent or could not be checked
(listed with the others in healthcare_emulator/README.md, "Choices made where the documentation
is silent"), briefly:

STOW-RS (`POST studies`, `POST studies/{study}`)
- Bodies: `multipart/related; type="application/dicom"` (type quoted or not, or absent: parts then
  default to application/dicom), or a single instance as `Content-Type: application/dicom`.
  `type=application/dicom+json|+xml` (metadata + bulk data) -> 501 UNIMPLEMENTED; any other media
  type -> 415. Malformed multipart (no/invalid boundary, no delimiter, truncated part headers, no
  closing delimiter, empty) -> 400 INVALID_ARGUMENT naming the problem. Body > 512 MiB -> 413
  (checked on Content-Length before reading, and while reading chunked bodies); > 10,000 parts
  -> 413. The body is read once into one buffer; each part is copied once and parsed once.
- Each part must be a DICOM Part 10 file (preamble + DICM) with valid Study/Series/SOP Instance
  UIDs (`^[0-9]+(\\.[0-9]+)*$`, <= 64 chars; leading zeros not checked) and a SOP Class UID.
  Otherwise it goes to FailedSOPSequence with FailureReason 0xC000 (49152, "cannot understand").
  A study UID different from `studies/{study}` in the URL -> 0xA900 (43264, PS3.18 "does not
  match"). A SOP Instance UID the store already has -> failure 0x0110 (272, "processing failure"),
  whether the bytes are the same or not (also twice in one request: the second part fails): the
  real API refuses to store an instance again without deleting it first (it answers 409 for this).
  Each failure item also carries Google's private FailureDetail (0009,0097) LT with a readable
  reason.
- HTTP status: 200 all stored, 202 some failed (PS3.18), 409 all failed (the real API's answer).
  Body `application/dicom+json`: RetrieveURL (0008,1190) of the study when the request concerns one
  study, ReferencedSOPSequence (ReferencedSOPClassUID, ReferencedSOPInstanceUID, RetrieveURL) and
  FailedSOPSequence (+ FailureReason). XML responses are not offered.
- Concurrency: the row is inserted (and the blob written) inside `State.tx()`, after looking the SOP
  Instance UID up in the same transaction, so of concurrent STOWs of one instance exactly one succeeds.

QIDO-RS (`studies`, `series`, `instances`, `studies/{s}/series`, `studies/{s}/instances`,
`studies/{s}/series/{se}/instances`)
- Match keys by keyword or tag (`PatientID` / `00100020`): UIDs (exact or a list split on `,` or
  `\\`), dates (`StudyDate`, `SeriesDate`, `PatientBirthDate`, ... exact or `A-B`, `A-`, `-B`), person
  names (case-insensitive, `*`/`?` wildcards), other strings (case-sensitive, wildcards), numbers
  (`SeriesNumber`, `InstanceNumber`, exact). Attributes of a higher level may be used at a lower one;
  lower-level keys at a higher level -> 400, except `Modality` / `ModalitiesInStudy` at study level
  (studies with any such series). An empty value is universal matching (the attribute is returned).
  Unknown or unsupported keys -> 400. `fuzzymatching` is accepted and ignored. Google's standard
  system parameters (`access_token`, `alt`, `key`, ...) are ignored.
- `limit`/`offset` (non-negative integers; limit 0 = default): defaults 100 studies/series and 1,000
  instances, maxima 5,000 / 50,000 (larger limits are clamped), as Google documents. When more results
  remain, a `Warning: 299 ...` header says so (PS3.18).
- `includefield`: keyword, tag, `all` (repeated or comma-separated); unknown keyword -> 400; known DICOM
  attributes that are not indexed are silently not returned.
- Returned: PS3.18 default attributes per level that the instance has, RetrieveURL and ModalitiesInStudy
  (derived); NumberOfStudyRelatedSeries / NumberOfStudyRelatedInstances (studies) and
  NumberOfSeriesRelatedInstances (series), counted over what the store holds at the time of the
  search, only when asked for with `includefield` (keyword or tag) or `includefield=all`;
  series results always carry StudyInstanceUID, instance results Study/SeriesInstanceUID; store-wide
  and study-wide (relational) searches add the defaults of the levels above. Study/series attributes
  come from the first stored instance of the study/series. Order: first stored first.
- No match -> 204 No Content with no body (the real API does this since 2020).

WADO-RS
- `studies/{s}[/series/{se}[/instances/{i}]]` -> `multipart/related; type="application/dicom"`
  streamed from the stored files (bytes exactly as stored). The emulator never transcodes: with no
  transfer-syntax or `transfer-syntax=*` (or the stored one) the stored bytes are returned and each
  part is labelled with its real transfer syntax; asking explicitly for another one -> 406. An
  instance may also be fetched single-part with `Accept: application/dicom`.
- `.../metadata` (study, series, instance) -> DICOM JSON array read from the stored files, without
  file meta. Pixel Data and other bulk values (VR OB/OD/OF/OL/OV/OW/UN longer than 1 KiB, also in
  sequences) are replaced by a BulkDataURI, which `.../instances/{i}/bulkdata/{tag}[/{item}/{tag}...]`
  serves (`multipart/related; type="application/octet-stream"`, or single part with
  `Accept: application/octet-stream`) as the element's raw value bytes (not decompressed).
- Frames, rendered and thumbnail resources -> 501 UNIMPLEMENTED.
- Unknown study/series/instance -> 404 NOT_FOUND.

Delete (`DELETE studies/{s}`, `studies/{s}/series/{se}`, `studies/{s}/series/{se}/instances/{i}`)
- Removes the rows and blobs no row refers to any more; 404 when nothing matches. The real API answers
  study and series deletes with a long-running Operation; the emulator deletes synchronously and answers
  `{}` (200) at every level.

Notifications: `ctx.notify(store, action, instance)` after each new instance is committed
(action `StoreInstances`) and after each deleted one (`DeleteInstance`, `DeleteSeries`,
`DeleteStudy`: the name of the endpoint, as the DicomNotificationConfig `action` attribute is
documented). `instance` = {study, series, sop, sop_class, modality, stored_at} (+ `deleted_at` for
deletes). A failing notifier is logged and never fails the request.

Hostile input: path UIDs must be valid UIDs (so never `.`/`..`) -> 400 otherwise; unknown paths -> 404.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from werkzeug.wrappers import Request, Response

from .errors import ApiError, invalid, not_found

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 512 * 1024 * 1024
MAX_PARTS = 10_000
MAX_PART_HEADER_BYTES = 16 * 1024
READ_CHUNK = 1024 * 1024
BULK_THRESHOLD = 1024
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

DICOM_JSON = "application/dicom+json"
UID_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
DATE_RE = re.compile(r"^[0-9]{8}$")
TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")

# PS3.18 / PS3.7 failure reasons.
FAIL_PROCESSING = 0x0110       # 272: processing failure (what the real API reports for conflicts)
FAIL_MISMATCH = 0xA900         # 43264: data set does not match (study UID differs from the URL)
FAIL_CANNOT_UNDERSTAND = 0xC000  # 49152: not DICOM / missing or invalid UIDs
FAILURE_DETAIL_TAG = "00090097"  # Google's private FailureDetail (LT)

SYSTEM_PARAMS = {"access_token", "alt", "key", "$.xgafv", "prettyprint", "quotauser", "fields",
                 "callback", "oauth_token", "upload_protocol", "uploadtype", "userip"}

STUDY, SERIES, INSTANCE = 0, 1, 2
LEVEL_NAMES = {STUDY: "study", SERIES: "series", INSTANCE: "instance"}
DEFAULT_LIMIT = {STUDY: 100, SERIES: 100, INSTANCE: 1000}
MAX_LIMIT = {STUDY: 5000, SERIES: 5000, INSTANCE: 50000}


class Attr:
    """An indexed attribute: its level, how QIDO matches it, whether it is returned by default."""

    def __init__(self, keyword: str, level: int, match: str | None, default: bool):
        self.keyword = keyword
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        self.tag = f"{tag:08X}"
        self.level = level
        self.match = match          # "uid", "date", "pn", "str", "num" or None (not matchable)
        self.default = default


# What `attrs` holds for each instance (from its own file) and QIDO can match / return.
ATTRS: list[Attr] = [
    # study (with patient) level
    Attr("SpecificCharacterSet", STUDY, None, True),
    Attr("StudyDate", STUDY, "date", True),
    Attr("StudyTime", STUDY, "str", True),
    Attr("AccessionNumber", STUDY, "str", True),
    Attr("ReferringPhysicianName", STUDY, "pn", True),
    Attr("TimezoneOffsetFromUTC", STUDY, "str", True),
    Attr("StudyDescription", STUDY, "str", False),
    Attr("PatientName", STUDY, "pn", True),
    Attr("PatientID", STUDY, "str", True),
    Attr("IssuerOfPatientID", STUDY, "str", False),
    Attr("PatientBirthDate", STUDY, "date", True),
    Attr("PatientSex", STUDY, "str", True),
    Attr("PatientAge", STUDY, "str", False),
    Attr("StudyInstanceUID", STUDY, "uid", True),
    Attr("StudyID", STUDY, "str", True),
    # series level
    Attr("SeriesDate", SERIES, "date", False),
    Attr("SeriesTime", SERIES, "str", False),
    Attr("Modality", SERIES, "str", True),
    Attr("SeriesDescription", SERIES, "str", True),
    Attr("Manufacturer", SERIES, "str", False),
    Attr("ManufacturerModelName", SERIES, "str", False),
    Attr("BodyPartExamined", SERIES, "str", False),
    Attr("SeriesInstanceUID", SERIES, "uid", True),
    Attr("SeriesNumber", SERIES, "num", True),
    Attr("Laterality", SERIES, "str", False),
    Attr("PerformedProcedureStepStartDate", SERIES, "date", True),
    Attr("PerformedProcedureStepStartTime", SERIES, "str", True),
    # instance level
    Attr("ImageType", INSTANCE, "str", False),
    Attr("SOPClassUID", INSTANCE, "uid", True),
    Attr("SOPInstanceUID", INSTANCE, "uid", True),
    Attr("ContentDate", INSTANCE, "date", False),
    Attr("AcquisitionDate", INSTANCE, "date", False),
    Attr("ContentTime", INSTANCE, "str", False),
    Attr("AcquisitionTime", INSTANCE, "str", False),
    Attr("AvailableTransferSyntaxUID", INSTANCE, "uid", False),  # from the file meta
    Attr("InstanceNumber", INSTANCE, "num", True),
    Attr("SamplesPerPixel", INSTANCE, None, False),
    Attr("PhotometricInterpretation", INSTANCE, "str", False),
    Attr("NumberOfFrames", INSTANCE, "num", True),
    Attr("Rows", INSTANCE, "num", True),
    Attr("Columns", INSTANCE, "num", True),
    Attr("BitsAllocated", INSTANCE, "num", True),
]
ATTR_BY_TAG = {a.tag: a for a in ATTRS}
INDEXED_FROM_DATASET = [a for a in ATTRS if a.keyword != "AvailableTransferSyntaxUID"]

# Tags used in code; the first five are derived at query time.
T_RETRIEVE_URL = "00081190"
T_MODALITIES_IN_STUDY = "00080061"
T_N_STUDY_SERIES = "00201206"
T_N_STUDY_INSTANCES = "00201208"
T_N_SERIES_INSTANCES = "00201209"
T_MODALITY = "00080060"
T_TRANSFER_SYNTAX = "00083002"
UID_COLUMN = {"0020000D": "study", "0020000E": "series", "00080018": "sop"}


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------

def handle(ctx, store: str, method: str, path: str, request: Request) -> Response:
    method = method.upper()
    segs = path.strip("/").split("/") if path.strip("/") else []
    if any(s == "" for s in segs):
        raise invalid(f"Invalid DICOMweb path {path!r}: empty path segment.")
    n = len(segs)
    if not segs or segs[0] not in ("studies", "series", "instances"):
        raise _no_method(method, path, segs)

    if method == "POST":
        if segs == ["studies"]:
            return _stow(ctx, store, request, None)
        if n == 2 and segs[0] == "studies":
            return _stow(ctx, store, request, _path_uid(segs[1], "study"))
        raise _no_method(method, path, segs)

    if method == "DELETE":
        if segs[0] == "studies" and n in (2, 4, 6) and _shape_ok(segs):
            uids = _path_uids(segs)
            return _delete(ctx, store, *uids)
        raise _no_method(method, path, segs)

    if method not in ("GET", "HEAD"):
        raise _no_method(method, path, segs)

    # QIDO
    if n == 1:
        level = {"studies": STUDY, "series": SERIES, "instances": INSTANCE}[segs[0]]
        return _qido(ctx, store, request, level, None, None)
    if segs[0] != "studies":
        raise _no_method(method, path, segs)
    if n == 3 and segs[2] in ("series", "instances"):
        study = _path_uid(segs[1], "study")
        return _qido(ctx, store, request, SERIES if segs[2] == "series" else INSTANCE, study, None)
    if n == 5 and segs[2] == "series" and segs[4] == "instances":
        study, series = _path_uid(segs[1], "study"), _path_uid(segs[3], "series")
        return _qido(ctx, store, request, INSTANCE, study, series)

    # WADO
    resource, rest = _split_resource(segs)
    k = len(resource)
    if not _shape_ok(resource):
        raise _no_method(method, path, segs)
    uids = _path_uids(resource)
    if not rest:
        return _retrieve(ctx, store, request, *uids)
    if rest == ["metadata"]:
        return _metadata(ctx, store, request, *uids)
    if rest[0] == "bulkdata" and k == 6 and len(rest) >= 2:
        return _bulkdata(ctx, store, request, *uids, rest[1:])
    if rest[0] in ("frames", "rendered", "thumbnail") and (k == 6 or rest[0] != "frames"):
        raise ApiError("UNIMPLEMENTED", f"The emulator does not implement DICOMweb {rest[0]} resources.")
    raise _no_method(method, path, segs)


_PARAM_RE = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """`type/subtype; a=b; c="d"` -> ("type/subtype", {"a": "b", "c": "d"}), lenient about what
    unquoted values contain (`type=application/dicom` is common though not a token)."""
    mimetype, _, rest = value.partition(";")
    params = {}
    for name, raw in _PARAM_RE.findall(";" + rest):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[name.lower()] = raw
    return mimetype.strip().lower(), params


def _no_method(method: str, path: str, segs: list[str]) -> ApiError:
    """404 for a path DICOMweb does not have; 405 (as the server does) for a method it has not."""
    if _known_path(segs):
        return ApiError("NOT_FOUND", f"Method {method} is not supported on dicomWeb/{path}.", http=405)
    return not_found(f"The requested URL dicomWeb/{path} was not found on this server.")


def _split_resource(segs: list[str]) -> tuple[list[str], list[str]]:
    """studies/S[/series/SE[/instances/I]] and what follows it."""
    n, k = len(segs), 2
    if n >= 4 and segs[2] == "series":
        k = 4
        if n >= 6 and segs[4] == "instances":
            k = 6
    return segs[:k], segs[k:]


def _known_path(segs: list[str]) -> bool:
    n = len(segs)
    if n == 1:
        return segs[0] in ("studies", "series", "instances")
    if not segs or segs[0] != "studies":
        return False
    if (n == 3 and segs[2] in ("series", "instances")) or (n == 5 and segs[2] == "series" and segs[4] == "instances"):
        return True
    resource, rest = _split_resource(segs)
    if not _shape_ok(resource):
        return False
    k = len(resource)
    return (not rest or rest == ["metadata"] or rest[0] in ("rendered", "thumbnail")
            or (k == 6 and rest[0] in ("bulkdata", "frames") and len(rest) >= 2))


def _shape_ok(segs: list[str]) -> bool:
    names = ["studies", None, "series", None, "instances", None]
    return len(segs) in (2, 4, 6) and all(names[i] is None or segs[i] == names[i] for i in range(len(segs)))


def _path_uids(segs: list[str]) -> tuple[str | None, str | None, str | None]:
    study = _path_uid(segs[1], "study")
    series = _path_uid(segs[3], "series") if len(segs) > 3 else None
    sop = _path_uid(segs[5], "instance") if len(segs) > 5 else None
    return study, series, sop


def _path_uid(value: str, what: str) -> str:
    if not valid_uid(value):
        raise invalid(f"Invalid {what} UID {value[:80]!r} in the DICOMweb path: a UID is up to 64 "
                      f"digits and dots.")
    return value


def valid_uid(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dicomweb_base(ctx, request: Request, store: str) -> str:
    return f"{ctx.base_url(request)}{store}/dicomWeb/"


def _url(base: str, study: str, series: str | None = None, sop: str | None = None) -> str:
    u = f"{base}studies/{study}"
    if series:
        u += f"/series/{series}"
        if sop:
            u += f"/instances/{sop}"
    return u


def _notify(ctx, store: str, action: str, instance: dict) -> None:
    try:
        ctx.notify(store, action, instance)
    except Exception:  # a notification must never fail the request
        log.exception("notification %s for %s failed", action, instance.get("sop"))


def _json_response(body: Any, status: int = 200, content_type: str = DICOM_JSON) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, content_type=content_type)


def _too_large(message: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, http=413)


# ------------------------------------------------------------------------------------------------
# STOW-RS
# ------------------------------------------------------------------------------------------------

def _stow(ctx, store: str, request: Request, url_study: str | None) -> Response:
    max_body = int(getattr(ctx, "dicomweb_max_body_bytes", MAX_BODY_BYTES))
    max_parts = int(getattr(ctx, "dicomweb_max_parts", MAX_PARTS))
    if request.content_length is not None and request.content_length > max_body:
        raise _too_large(f"Request body of {request.content_length} bytes exceeds the limit of "
                         f"{max_body} bytes.")
    mimetype, params = parse_media_type(request.headers.get("Content-Type", ""))
    mimetype = mimetype.lower()
    if mimetype == "multipart/related":
        part_type = (params.get("type") or "").strip().lower() or None
        if part_type in ("application/dicom+json", "application/dicom+xml"):
            raise ApiError("UNIMPLEMENTED", f"STOW-RS with type={part_type} (metadata and bulk data) is "
                                            f"not supported by the emulator; send application/dicom parts.")
        if part_type not in (None, "application/dicom"):
            raise ApiError("INVALID_ARGUMENT", f"Unsupported multipart/related type {part_type!r}; "
                                               f"expected application/dicom.", http=415)
        boundary = params.get("boundary")
        if not boundary:
            raise invalid("multipart/related request without a boundary parameter in Content-Type.")
        if len(boundary) > 70 or any(c in boundary for c in "\r\n"):
            raise invalid("Invalid multipart boundary: it must be 1 to 70 characters on one line.")
        body = _read_body(request, max_body)
        parts = _split_multipart(body, boundary.encode("latin-1", "replace"), max_parts)
    elif mimetype == "application/dicom":
        body = _read_body(request, max_body)
        if not body:
            raise invalid("Empty request body.")
        parts = [(None, 0, len(body))]
    else:
        shown = mimetype or "none"
        raise ApiError("INVALID_ARGUMENT", f"Unsupported Content-Type {shown!r}: STOW-RS takes "
                                           f"multipart/related; type=\"application/dicom\" or "
                                           f"application/dicom.", http=415)

    base = _dicomweb_base(ctx, request, store)
    view = memoryview(body)
    referenced, failed, studies = [], [], set()
    for index, (part_ct, start, end) in enumerate(parts, 1):
        outcome = _store_part(ctx, store, base, url_study, index, part_ct, view[start:end])
        if outcome.get("study"):
            studies.add(outcome["study"])
        (referenced if outcome["ok"] else failed).append(outcome["item"])
    view.release()
    del body

    result: dict[str, Any] = {}
    retrieve_study = url_study or (next(iter(studies)) if len(studies) == 1 else None)
    if retrieve_study:
        result[T_RETRIEVE_URL] = {"vr": "UR", "Value": [_url(base, retrieve_study)]}
    if failed:
        result["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        result["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    return _json_response(result, status)


def _read_body(request: Request, max_body: int) -> bytearray | bytes:
    cached = request.__dict__.get("_cached_data")
    if cached is not None:  # the server already read it
        if len(cached) > max_body:
            raise _too_large(f"Request body exceeds the limit of {max_body} bytes.")
        return cached
    buf = bytearray()
    stream = request.stream
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        buf += chunk
        if len(buf) > max_body:
            raise _too_large(f"Request body exceeds the limit of {max_body} bytes.")
    return buf


def _split_multipart(body: bytes | bytearray, boundary: bytes,
                     max_parts: int) -> list[tuple[str | None, int, int]]:
    """RFC 2046 framing: [(part Content-Type or None, start, end)], offsets into `body` (no copies)."""
    if not body:
        raise invalid("Empty request body.")
    dash = b"--" + boundary
    delim = b"\r\n" + dash
    size = len(body)

    def after_delimiter(at: int) -> int | None:
        """Where the part headers start if `at` (just past a delimiter) ends a boundary line;
        -1 for the close delimiter; None if this is not a boundary line."""
        if body[at:at + 2] == b"--":
            return -1
        j = at
        while j < size and body[j] in b" \t":
            j += 1
        if body[j:j + 2] == b"\r\n":
            return j + 2
        return None

    # The first delimiter: at the very start, or after a CRLF (ending an ignored preamble).
    pos = None
    if body.startswith(dash):
        pos = after_delimiter(len(dash))
    search = 0
    while pos is None:
        i = body.find(delim, search)
        if i < 0:
            raise invalid("Malformed multipart body: no boundary delimiter "
                          f"'--{boundary.decode('latin-1')}' found.")
        pos = after_delimiter(i + len(delim))
        search = i + 1
    if pos == -1:
        raise invalid("Malformed multipart body: it has no parts.")

    parts: list[tuple[str | None, int, int]] = []
    while True:
        # Part headers (possibly none), then a blank line.
        if body[pos:pos + 2] == b"\r\n":
            headers_text, content_start = "", pos + 2
        else:
            end_headers = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEADER_BYTES)
            if end_headers < 0:
                raise invalid(f"Malformed multipart body: part {len(parts) + 1} has truncated or "
                              f"oversized headers (no blank line after them).")
            headers_text = bytes(body[pos:end_headers]).decode("latin-1")
            content_start = end_headers + 4
        part_type = _part_content_type(headers_text, len(parts) + 1)
        # The part ends at the next delimiter that really ends a line.
        search = content_start
        while True:
            d = body.find(delim, search)
            if d < 0:
                raise invalid(f"Malformed multipart body: part {len(parts) + 1} is not terminated; the "
                              f"closing delimiter '--{boundary.decode('latin-1')}--' is missing "
                              f"(truncated body?).")
            nxt = after_delimiter(d + len(delim))
            if nxt is not None:
                break
            search = d + 1
        parts.append((part_type, content_start, d))
        if len(parts) > max_parts:
            raise _too_large(f"Too many parts in the multipart body (limit {max_parts}).")
        if nxt == -1:
            return parts
        pos = nxt


def _part_content_type(headers_text: str, index: int) -> str | None:
    content_type = None
    for line in headers_text.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise invalid(f"Malformed multipart body: part {index} has an invalid header line "
                          f"{line[:60]!r}.")
        if name.strip().lower() == "content-type":
            content_type = parse_media_type(value.strip())[0].lower()
    return content_type


def _failure(reason: int, detail: str, sop_class: str | None = None, sop: str | None = None,
             study: str | None = None) -> dict:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop:
        item["00081155"] = {"vr": "UI", "Value": [sop]}
    item["00081197"] = {"vr": "US", "Value": [reason]}
    item[FAILURE_DETAIL_TAG] = {"vr": "LT", "Value": [detail]}
    return {"ok": False, "item": item, "study": study}


def _store_part(ctx, store: str, base: str, url_study: str | None, index: int,
                part_type: str | None, view: memoryview) -> dict:
    if part_type not in (None, "application/dicom"):
        return _failure(FAIL_CANNOT_UNDERSTAND, f"Part {index}: unsupported media type {part_type!r}; "
                                                f"expected application/dicom.")
    data = bytes(view)  # the one copy of this part: hashed, parsed and stored from here
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sop_class = _str_value(ds, "SOPClassUID") or _str_value(ds.file_meta, "MediaStorageSOPClassUID")
        study = _str_value(ds, "StudyInstanceUID")
        series = _str_value(ds, "SeriesInstanceUID")
        sop = _str_value(ds, "SOPInstanceUID")
    except Exception as e:  # pydicom raises many kinds on junk
        return _failure(FAIL_CANNOT_UNDERSTAND, f"Part {index} is not a valid DICOM Part 10 file: "
                                                f"{type(e).__name__}: {str(e)[:200]}")
    known = {"sop_class": sop_class if valid_uid(sop_class) else None,
             "sop": sop if valid_uid(sop) else None, "study": study if valid_uid(study) else None}
    for name, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                        ("SOPInstanceUID", sop), ("SOPClassUID", sop_class)):
        if not value:
            return _failure(FAIL_CANNOT_UNDERSTAND, f"Part {index}: missing {name}.", **known)
        if not valid_uid(value):
            return _failure(FAIL_CANNOT_UNDERSTAND, f"Part {index}: invalid {name} {value[:80]!r}.", **known)
    if url_study and study != url_study:
        return _failure(FAIL_MISMATCH, f"Part {index}: StudyInstanceUID {study} does not match the study "
                                       f"{url_study} in the request URL.", **known)
    try:
        attrs = index_attributes(ds)
    except Exception as e:
        return _failure(FAIL_PROCESSING, f"Part {index}: cannot index the instance: {e}", **known)
    del ds
    sha = hashlib.sha256(data).hexdigest()
    stored_at = _now()
    state = ctx.state
    with state.tx() as db:
        row = db.execute("SELECT blob, study, series FROM instances WHERE store = ? AND sop = ?",
                         (store, sop)).fetchone()
        if row is None:
            state.put_blob(data)
            db.execute("INSERT INTO instances (store, study, series, sop, sop_class, blob, size, stored_at,"
                       " attrs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (store, study, series, sop, sop_class, sha, len(data), stored_at,
                        json.dumps(attrs, separators=(",", ":"))))
        else:
            same = "the same" if row["blob"] == sha else "different"
            return _failure(FAIL_PROCESSING, f"Part {index}: an instance with SOP Instance UID {sop} already "
                                             f"exists in this DICOM store (with {same} content); delete it "
                                             f"first to store it again.", **known)
    modality = (attrs.get(T_MODALITY, {}).get("Value") or [None])[0]
    _notify(ctx, store, "StoreInstances", {"study": study, "series": series, "sop": sop,
                                           "sop_class": sop_class, "modality": modality,
                                           "stored_at": stored_at})
    item = {"00081150": {"vr": "UI", "Value": [sop_class]},
            "00081155": {"vr": "UI", "Value": [sop]},
            T_RETRIEVE_URL: {"vr": "UR", "Value": [_url(base, study, series, sop)]}}
    return {"ok": True, "item": item, "study": study}


def _str_value(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().rstrip("\x00").strip()


def _element_json(elem) -> dict | None:
    try:
        j = elem.to_json_dict(None, 1 << 62)
        json.dumps(j, allow_nan=False)
        return j
    except Exception:
        log.debug("attribute %s not representable in DICOM JSON", elem.tag, exc_info=True)
        return None


def index_attributes(ds: Dataset) -> dict:
    """The DICOM JSON of the indexed attributes of one instance (header only)."""
    out: dict[str, dict] = {}
    for attr in INDEXED_FROM_DATASET:
        tag = int(attr.tag, 16)
        if tag in ds:
            try:
                elem = ds[tag]
            except Exception:
                continue
            j = _element_json(elem)
            if j is not None:
                out[attr.tag] = j
    ts = _str_value(ds.file_meta, "TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        out[T_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [ts]}
    return out


# ------------------------------------------------------------------------------------------------
# QIDO-RS
# ------------------------------------------------------------------------------------------------

def _resolve_attribute(key: str) -> tuple[str, str]:
    """(tag hex, display name) of a query key given as keyword or tag; 400 if it is neither."""
    if TAG_RE.match(key):
        tag = key.upper()
        return tag, keyword_for_tag(int(tag, 16)) or tag
    tag_int = tag_for_keyword(key)
    if tag_int is None:
        raise invalid(f"Unknown DICOM attribute {key!r} in the query.", field=key)
    return f"{tag_int:08X}", key


class Query:
    def __init__(self, level: int):
        self.level = level
        self.conditions: list[str] = []
        self.params: list[Any] = []
        self.include: set[str] = set()
        self.include_all = False
        self.limit = DEFAULT_LIMIT[level]
        self.offset = 0
        self.warnings: list[str] = []


def _parse_query(request: Request, level: int) -> Query:
    q = Query(level)
    seen: set[str] = set()
    for key, values in request.args.lists():
        lower = key.lower()
        if lower in SYSTEM_PARAMS:
            continue
        if lower == "includefield":
            for value in values:
                for item in filter(None, (v.strip() for v in value.split(","))):
                    if item.lower() == "all":
                        q.include_all = True
                    else:
                        q.include.add(_resolve_attribute(item)[0])
            continue
        if lower in ("limit", "offset", "fuzzymatching"):
            if len(values) > 1:
                raise invalid(f"Query parameter {key!r} given more than once.", field=key)
            value = values[0].strip()
            if lower == "fuzzymatching":
                if value.lower() not in ("true", "false", ""):
                    raise invalid(f"fuzzymatching must be true or false, not {value!r}.", field=key)
                continue
            if not value.isdigit():
                raise invalid(f"{lower} must be a non-negative integer, not {value!r}.", field=key)
            number = int(value)
            if lower == "offset":
                q.offset = number
            elif number:
                if number > MAX_LIMIT[level]:
                    q.warnings.append(f"The limit {number} exceeds the maximum of {MAX_LIMIT[level]} "
                                      f"for {LEVEL_NAMES[level]} searches; {MAX_LIMIT[level]} is used.")
                    number = MAX_LIMIT[level]
                q.limit = number
            continue
        tag, name = _resolve_attribute(key)
        if tag in seen:
            raise invalid(f"Query attribute {name} given more than once.", field=key)
        seen.add(tag)
        _add_condition(q, tag, name, values)
    return q


def _add_condition(q: Query, tag: str, name: str, values: list[str]) -> None:
    level = q.level
    if tag in (T_MODALITIES_IN_STUDY,) or (tag == T_MODALITY and level == STUDY):
        attr = ATTR_BY_TAG[T_MODALITY]  # studies with any series of that modality
    else:
        attr = ATTR_BY_TAG.get(tag)
        if attr is None or attr.match is None:
            raise invalid(f"Unsupported search parameter {name}: the emulator matches "
                          f"{', '.join(a.keyword for a in ATTRS if a.match)} and ModalitiesInStudy.",
                          field=name)
        if attr.level > level:
            raise invalid(f"{name} is a {LEVEL_NAMES[attr.level]}-level attribute and cannot be used in "
                          f"a {LEVEL_NAMES[level]} search.", field=name)
        q.include.add(tag)
    if len(values) > 1 and attr.match != "uid":
        raise invalid(f"Query attribute {name} given more than once.", field=name)
    value = values[0] if len(values) == 1 else ",".join(values)
    if value == "":
        return  # universal matching: only returns the attribute
    path = f'$."{attr.tag}".Value'
    exists = f"EXISTS (SELECT 1 FROM json_each(i.attrs, '{path}') je WHERE {{}})"
    if attr.match == "uid":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        bad = [u for u in uids if not valid_uid(u)]
        if bad or not uids:
            raise invalid(f"Invalid UID {bad[0] if bad else value!r} in {name}.", field=name)
        marks = ",".join("?" * len(uids))
        column = UID_COLUMN.get(attr.tag)
        q.conditions.append(f"i.{column} IN ({marks})" if column else exists.format(f"je.value IN ({marks})"))
        q.params.extend(uids)
    elif attr.match == "date":
        if "-" in value:
            low, _, high = value.partition("-")
            low, high = low.strip(), high.strip()
            if (low and not DATE_RE.match(low)) or (high and not DATE_RE.match(high)) or not (low or high):
                raise invalid(f"Invalid date range {value!r} for {name}: use YYYYMMDD-YYYYMMDD, "
                              f"YYYYMMDD- or -YYYYMMDD.", field=name)
            if low and high:
                q.conditions.append(exists.format("je.value BETWEEN ? AND ?"))
                q.params.extend([low, high])
            elif low:
                q.conditions.append(exists.format("je.value >= ?"))
                q.params.append(low)
            else:
                q.conditions.append(exists.format("je.value <= ?"))
                q.params.append(high)
        else:
            if not DATE_RE.match(value):
                raise invalid(f"Invalid date {value!r} for {name}: use YYYYMMDD or a range.", field=name)
            q.conditions.append(exists.format("je.value = ?"))
            q.params.append(value)
    elif attr.match == "num":
        try:
            number = int(value)
        except ValueError:
            raise invalid(f"{name} must be an integer, not {value!r}.", field=name) from None
        q.conditions.append(exists.format("CAST(je.value AS INTEGER) = ?"))
        q.params.append(number)
    elif attr.match == "pn":
        pattern = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = pattern.replace("*", "%").replace("?", "_")
        q.conditions.append(exists.format(
            "(CASE je.type WHEN 'object' THEN json_extract(je.value, '$.Alphabetic') "
            "WHEN 'text' THEN je.value END) LIKE ? ESCAPE '\\'"))
        q.params.append(pattern)
    else:  # "str": case-sensitive, wildcards
        if "*" in value or "?" in value:
            q.conditions.append(exists.format("je.value GLOB ?"))
            q.params.append(value.replace("[", "[[]"))
        else:
            q.conditions.append(exists.format("je.value = ?"))
            q.params.append(value)


def _qido(ctx, store: str, request: Request, level: int, study: str | None,
          series: str | None) -> Response:
    q = _parse_query(request, level)
    where = ["i.store = ?"]
    params: list[Any] = [store]
    if study:
        where.append("i.study = ?")
        params.append(study)
    if series:
        where.append("i.series = ?")
        params.append(series)
    where += q.conditions
    params += q.params
    where_sql = " AND ".join(where)
    db = ctx.state.db()
    fetch = q.limit + 1
    if level == STUDY:
        rows = db.execute(f"""
            SELECT s.study AS study, s.ord AS ord,
              (SELECT COUNT(*) FROM instances a WHERE a.store = ? AND a.study = s.study) AS n_instances,
              (SELECT COUNT(DISTINCT a.series) FROM instances a
                 WHERE a.store = ? AND a.study = s.study) AS n_series,
              (SELECT json_group_array(DISTINCT json_extract(a.attrs, '$."{T_MODALITY}".Value[0]'))
                 FROM instances a WHERE a.store = ? AND a.study = s.study) AS modalities,
              (SELECT a.attrs FROM instances a WHERE a.store = ? AND a.study = s.study
                 ORDER BY a.rowid LIMIT 1) AS attrs
            FROM (SELECT i.study AS study, MIN(i.rowid) AS ord FROM instances i WHERE {where_sql}
                  GROUP BY i.study ORDER BY ord LIMIT ? OFFSET ?) s
            ORDER BY s.ord""", [store] * 4 + params + [fetch, q.offset]).fetchall()
    elif level == SERIES:
        rows = db.execute(f"""
            SELECT s.study AS study, s.series AS series, s.ord AS ord,
              (SELECT COUNT(*) FROM instances a WHERE a.store = ? AND a.study = s.study
                 AND a.series = s.series) AS n_instances,
              (SELECT a.attrs FROM instances a WHERE a.store = ? AND a.study = s.study
                 AND a.series = s.series ORDER BY a.rowid LIMIT 1) AS attrs
            FROM (SELECT i.study AS study, i.series AS series, MIN(i.rowid) AS ord FROM instances i
                  WHERE {where_sql} GROUP BY i.study, i.series ORDER BY ord LIMIT ? OFFSET ?) s
            ORDER BY s.ord""", [store] * 2 + params + [fetch, q.offset]).fetchall()
    else:
        rows = db.execute(f"""
            SELECT i.study AS study, i.series AS series, i.sop AS sop, i.attrs AS attrs
            FROM instances i WHERE {where_sql} ORDER BY i.rowid LIMIT ? OFFSET ?""",
                          params + [fetch, q.offset]).fetchall()

    more = len(rows) > q.limit
    rows = rows[:q.limit]
    headers = []
    if more:
        q.warnings.append("There are additional results that can be requested (use offset).")
    for w in q.warnings:
        headers.append(("Warning", f'299 healthcare.googleapis.com "{w}"'))
    if not rows:
        return Response(status=204, headers=headers)

    base = _dicomweb_base(ctx, request, store)
    relational_from = {STUDY: STUDY, SERIES: SERIES if study else STUDY,
                       INSTANCE: INSTANCE if series else (SERIES if study else STUDY)}[level]
    results = []
    for row in rows:
        attrs = json.loads(row["attrs"])
        wanted = _wanted_tags(q, attrs, relational_from)
        out = {tag: attrs[tag] for tag in wanted if tag in attrs}
        if level == STUDY:
            mods = sorted(m for m in json.loads(row["modalities"]) if m)
            out[T_MODALITIES_IN_STUDY] = {"vr": "CS", "Value": mods} if mods else {"vr": "CS"}
            if q.include_all or T_N_STUDY_SERIES in q.include:
                out[T_N_STUDY_SERIES] = {"vr": "IS", "Value": [row["n_series"]]}
            if q.include_all or T_N_STUDY_INSTANCES in q.include:
                out[T_N_STUDY_INSTANCES] = {"vr": "IS", "Value": [row["n_instances"]]}
            out[T_RETRIEVE_URL] = {"vr": "UR", "Value": [_url(base, row["study"])]}
        elif level == SERIES:
            if q.include_all or T_N_SERIES_INSTANCES in q.include:
                out[T_N_SERIES_INSTANCES] = {"vr": "IS", "Value": [row["n_instances"]]}
            out[T_RETRIEVE_URL] = {"vr": "UR", "Value": [_url(base, row["study"], row["series"])]}
            out.setdefault("0020000D", {"vr": "UI", "Value": [row["study"]]})
        else:
            out[T_RETRIEVE_URL] = {"vr": "UR", "Value": [_url(base, row["study"], row["series"], row["sop"])]}
            out.setdefault("0020000D", {"vr": "UI", "Value": [row["study"]]})
            out.setdefault("0020000E", {"vr": "UI", "Value": [row["series"]]})
        results.append(dict(sorted(out.items())))
    resp = _json_response(results)
    for name, value in headers:
        resp.headers.add(name, value)
    return resp


def _wanted_tags(q: Query, attrs: dict, relational_from: int) -> list[str]:
    """Tags to return at q.level: defaults of the levels in scope, includefield, match keys."""
    wanted = []
    for tag in attrs:
        attr = ATTR_BY_TAG.get(tag)
        if attr is None:
            continue
        if tag == "00080005":
            wanted.append(tag)  # SpecificCharacterSet: whenever the instance has one
        elif relational_from <= attr.level <= q.level:
            if attr.default or q.include_all or tag in q.include:
                wanted.append(tag)
        elif attr.level < relational_from and tag in q.include:
            wanted.append(tag)  # higher-level attributes asked for explicitly
    return wanted


# ------------------------------------------------------------------------------------------------
# WADO-RS
# ------------------------------------------------------------------------------------------------

def _rows(ctx, store: str, study: str, series: str | None, sop: str | None) -> list:
    sql = "SELECT study, series, sop, sop_class, blob, size, stored_at, attrs FROM instances " \
          "WHERE store = ? AND study = ?"
    params: list[Any] = [store, study]
    if series:
        sql += " AND series = ?"
        params.append(series)
    if sop:
        sql += " AND sop = ?"
        params.append(sop)
    rows = ctx.state.db().execute(sql + " ORDER BY rowid", params).fetchall()
    if not rows:
        if sop:
            raise not_found(f"Instance {sop} of series {series} of study {study} not found in the DICOM store.")
        if series:
            raise not_found(f"Series {series} of study {study} not found in the DICOM store.")
        raise not_found(f"Study {study} not found in the DICOM store.")
    return rows


def _accept_list(request: Request) -> list[tuple[str, dict]]:
    header = request.headers.get("Accept", "")
    out = []
    for item in header.split(","):
        item = item.strip()
        if item:
            mimetype, params = parse_media_type(item)
            out.append((mimetype.lower(), {k.lower(): v for k, v in params.items()}))
    return out


def _transfer_syntax(row) -> str:
    attrs = json.loads(row["attrs"])
    return (attrs.get(T_TRANSFER_SYNTAX, {}).get("Value") or ["1.2.840.10008.1.2.1"])[0]


def _check_transfer_syntax(requested: str | None, rows: list) -> None:
    if requested in (None, "", "*"):
        return
    for row in rows:
        actual = _transfer_syntax(row)
        if actual != requested:
            raise ApiError("INVALID_ARGUMENT", f"The emulator does not transcode: instance {row['sop']} is "
                                               f"stored with transfer syntax {actual}; request "
                                               f"transfer-syntax=* or {actual}.", http=406)


def _retrieve(ctx, store: str, request: Request, study: str, series: str | None,
              sop: str | None) -> Response:
    rows = _rows(ctx, store, study, series, sop)
    accepts = _accept_list(request) or [("multipart/related", {})]
    choice = None
    for mimetype, params in accepts:
        part_type = (params.get("type") or "application/dicom").lower()
        if mimetype in ("multipart/related", "multipart/*") and part_type == "application/dicom":
            choice = ("multipart", params.get("transfer-syntax"))
            break
        if mimetype == "application/dicom" and sop:
            choice = ("single", params.get("transfer-syntax"))
            break
        if mimetype in ("*/*", "multipart/*"):
            choice = ("multipart", None)
            break
    if choice is None:
        raise ApiError("INVALID_ARGUMENT", "Not acceptable: retrieve returns multipart/related; "
                                           "type=\"application/dicom\"" +
                       (" or application/dicom." if sop else "."), http=406)
    kind, requested_ts = choice
    _check_transfer_syntax(requested_ts, rows)
    state = ctx.state
    paths = [state.blob_path(row["blob"]) for row in rows]
    try:
        sizes = [os.stat(p).st_size for p in paths]
    except FileNotFoundError:
        raise ApiError("INTERNAL", "A stored DICOM file is missing from the emulator's data dir.") from None

    if kind == "single":
        ts = _transfer_syntax(rows[0])
        return Response(_file_chunks(paths[0]), status=200, direct_passthrough=True,
                        content_type=f"application/dicom; transfer-syntax={ts}",
                        headers={"Content-Length": str(sizes[0])})

    boundary = uuid.uuid4().hex
    heads = [f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={_transfer_syntax(r)}"
             f"\r\nContent-Length: {s}\r\n\r\n".encode() for r, s in zip(rows, sizes)]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + s + 2 for h, s in zip(heads, sizes)) + len(tail)

    def body() -> Iterator[bytes]:
        for head, path in zip(heads, paths):
            yield head
            yield from _file_chunks(path)
            yield b"\r\n"
        yield tail

    return Response(body(), status=200, direct_passthrough=True,
                    content_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
                    headers={"Content-Length": str(length)})


def _file_chunks(path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                return
            yield chunk


def _metadata(ctx, store: str, request: Request, study: str, series: str | None,
              sop: str | None) -> Response:
    rows = _rows(ctx, store, study, series, sop)
    base = _dicomweb_base(ctx, request, store)
    out = []
    for row in rows:
        bulk_base = _url(base, row["study"], row["series"], row["sop"]) + "/bulkdata/"
        ds = pydicom.dcmread(ctx.state.blob_path(row["blob"]), defer_size=BULK_THRESHOLD)
        out.append(dataset_json(ds, bulk_base))
    return _json_response(out)


def _raw_vr(tag, raw: RawDataElement) -> str:
    if raw.VR:
        return raw.VR
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return "OW" if "OW" in vr else vr.split(" or ")[0]


def dataset_json(ds: Dataset, bulk_base: str, prefix: str = "") -> dict:
    """DICOM JSON of a data set, bulk values replaced by BulkDataURIs `{bulk_base}{prefix}{tag}`."""
    out: dict[str, dict] = {}
    for tag in sorted(ds.keys()):
        if tag.group == 0x0002:
            continue
        key = f"{int(tag):08X}"
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            if isinstance(raw, RawDataElement):
                vr = _raw_vr(tag, raw)
                if tag == 0x7FE00010 or (vr in BULK_VRS and raw.length > BULK_THRESHOLD):
                    out[key] = {"vr": vr, "BulkDataURI": f"{bulk_base}{prefix}{key}"}
                    continue
            elem = ds[tag]
        except Exception:
            log.debug("cannot read element %s", key, exc_info=True)
            continue
        if elem.VR == "SQ":
            items = [dataset_json(item, bulk_base, f"{prefix}{key}/{n}/") for n, item in enumerate(elem.value)]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
        elif tag == 0x7FE00010 or (elem.VR in BULK_VRS and isinstance(elem.value, (bytes, bytearray))
                                   and len(elem.value) > BULK_THRESHOLD):
            out[key] = {"vr": elem.VR, "BulkDataURI": f"{bulk_base}{prefix}{key}"}
        else:
            j = _element_json(elem)
            if j is not None:
                out[key] = j
    return out


def _bulkdata(ctx, store: str, request: Request, study: str, series: str, sop: str,
              rest: list[str]) -> Response:
    if len(rest) % 2 == 0 or not all(TAG_RE.match(t) for t in rest[0::2]) \
            or not all(i.isdigit() and len(i) < 7 for i in rest[1::2]):
        raise invalid("Invalid bulkdata path: expected {tag}[/{item}/{tag}...] with 8-digit hex tags.")
    row = _rows(ctx, store, study, series, sop)[0]
    ds: Dataset = pydicom.dcmread(ctx.state.blob_path(row["blob"]), defer_size=BULK_THRESHOLD)
    missing = not_found(f"Bulkdata {'/'.join(rest)} not found in instance {sop}.")
    try:
        for seq_tag, index in zip(rest[0:-1:2], rest[1::2]):
            tag = int(seq_tag, 16)
            if tag not in ds or ds[tag].VR != "SQ" or int(index) >= len(ds[tag].value):
                raise missing
            ds = ds[tag].value[int(index)]
        tag = int(rest[-1], 16)
        if tag not in ds:
            raise missing
        value = ds[tag].value
    except ApiError:
        raise
    except Exception:
        raise missing from None
    if not isinstance(value, (bytes, bytearray)):
        raise invalid(f"Element {rest[-1]} is not a bulkdata (binary) element.")
    value = bytes(value)
    accepts = [m for m, _ in _accept_list(request)]
    if "application/octet-stream" in accepts and not any(m.startswith("multipart/") for m in accepts):
        return Response(value, status=200, content_type="application/octet-stream")
    boundary = uuid.uuid4().hex
    body = b"".join([f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(), value,
                     f"\r\n--{boundary}--\r\n".encode()])
    return Response(body, status=200,
                    content_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')


# ------------------------------------------------------------------------------------------------
# delete
# ------------------------------------------------------------------------------------------------

def _delete(ctx, store: str, study: str, series: str | None, sop: str | None) -> Response:
    action = "DeleteInstance" if sop else ("DeleteSeries" if series else "DeleteStudy")
    where = "store = ? AND study = ?"
    params: list[Any] = [store, study]
    if series:
        where += " AND series = ?"
        params.append(series)
    if sop:
        where += " AND sop = ?"
        params.append(sop)
    state = ctx.state
    # Blob writes happen inside tx() (under write_lock) too, so dropping blobs under the same lock
    # cannot race with a STOW that is about to refer to the same bytes.
    with state.write_lock:
        with state.tx() as db:
            rows = db.execute(f"SELECT study, series, sop, sop_class, blob, stored_at, attrs FROM instances "
                              f"WHERE {where} ORDER BY rowid", params).fetchall()
            if rows:
                db.execute(f"DELETE FROM instances WHERE {where}", params)
        if not rows:
            _rows(ctx, store, study, series, sop)  # raises the right NOT_FOUND
        state.drop_unreferenced_blobs({r["blob"] for r in rows})
    deleted_at = _now()
    for r in rows:
        modality = (json.loads(r["attrs"]).get(T_MODALITY, {}).get("Value") or [None])[0]
        _notify(ctx, store, action, {"study": r["study"], "series": r["series"], "sop": r["sop"],
                                     "sop_class": r["sop_class"], "modality": modality,
                                     "stored_at": r["stored_at"], "deleted_at": deleted_at})
    return Response("{}", status=200, content_type="application/json")
