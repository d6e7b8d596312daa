"""Reading a DICOM file's header with pydicom (never pixel data)."""
from __future__ import annotations

import os
import struct

import pydicom
from pydicom.errors import InvalidDicomError

_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData",
               0x7FE00009: "DoubleFloatPixelData"}
_HDR_ATTR = "_bq_skipped_tail"  # attribute of a read Dataset: the pixel data tags read_header skipped


class InvalidDicom(Exception):
    """The input is not a readable DICOM file."""


_DEFER = 1 << 20


def _tail_tags(fp, ds) -> tuple:
    """Peek at the element where stop_before_pixels stopped."""
    try:
        b = fp.read(4)
    except Exception:  # noqa: BLE001
        return ()
    if len(b) != 4:
        return ()
    little = True
    try:
        little = ds.original_encoding[1] is not False
    except Exception:  # noqa: BLE001
        pass
    g, e = struct.unpack("<HH" if little else ">HH", b)
    t = (g << 16) | e
    return (t,) if t in _PIXEL_TAGS else ()


def _read(fp) -> "pydicom.Dataset":
    try:
        start = fp.tell()
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER)
    except InvalidDicomError:
        fp.seek(start)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER, force=True)
        except Exception as exc:  # noqa: BLE001
            raise InvalidDicom(f"not a DICOM file ({type(exc).__name__})") from None
        if 0x00080018 not in ds._dict:
            raise InvalidDicom("not a DICOM file (no Part-10 header and no SOP Instance UID)") from None
    except Exception as exc:  # noqa: BLE001
        raise InvalidDicom(f"unreadable DICOM file ({type(exc).__name__})") from None
    tail = _tail_tags(fp, ds)
    if tail:
        object.__setattr__(ds, _HDR_ATTR, tail)
    return ds


def read_header(path_or_file) -> "pydicom.Dataset":
    """Read a DICOM file's header (everything but the pixel data).

    `path_or_file` is a path or a binary file object positioned at the start of
    the file (left open).  Values larger than 1 MiB stay deferred in the file.
    Raises InvalidDicom when the input is not DICOM."""
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        try:
            fp = open(path_or_file, "rb")
        except OSError as exc:
            raise InvalidDicom(f"cannot open file ({type(exc).__name__})") from None
        with fp:
            return _read(fp)
    return _read(path_or_file)
