"""Real DICOM files for tests: pydicom's bundled corpus, and copies of it with fresh UIDs."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import generate_uid

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


@lru_cache(maxsize=None)
def bundled() -> tuple[Path, ...]:
    """Every file of pydicom's bundled test corpus (listed from the folder: never fetched)."""
    return tuple(sorted(p for p in TEST_FILES.rglob("*") if p.is_file()))


@lru_cache(maxsize=None)
def storable() -> tuple[Path, ...]:
    """Bundled files with a File Meta header and the three UIDs: what a STOW accepts."""
    out = []
    for p in bundled():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
            continue
        try:
            if all(str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
                out.append(p)
        except Exception:
            continue
    return tuple(out)


def path(name: str) -> Path:
    p = TEST_FILES / name
    assert p.is_file(), name
    return p


def with_uids(src: Path | str, dest: Path, *, study: str | None = None, series: str | None = None,
              sop: str | None = None, **attrs) -> Path:
    """Copy `src` with new UIDs (fresh unless given) and optional attribute overrides."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(dest, enforce_file_format=False)
    return dest
