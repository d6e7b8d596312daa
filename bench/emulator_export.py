"""Benchmark: the emulator's export rate against pydicom's header-only read rate of the same files.

    python bench/emulator_export.py [--instances 20000]

A corpus is made by re-writing pydicom's bundled test files with fresh UIDs, stored through STOW-RS,
then exported. Printed, from the same run:
  - baseline: pydicom `dcmread(stop_before_pixels=True)` over the stored files (instances/s)
  - export: instances/s from the export call to the operation's end (goal: >= 0.5x the baseline)
  - memory: the emulator's peak RSS growth (server process; the mapping workers hold one chunk each)
    during an export of a quarter of the corpus and of all of it, after a warm-up export (must not
    grow with the corpus)
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from stack import dicom_files  # noqa: E402
from stack import services as procs  # noqa: E402
from stack.hcapi import HC  # noqa: E402

MAX_SOURCE_BYTES = 2 * 1024 * 1024  # keep the corpus to typical header-heavy instances


def make_corpus(n: int, out: Path) -> list[Path]:
    datasets = []
    for p in dicom_files.storable():
        if p.stat().st_size > MAX_SOURCE_BYTES:
            continue
        ds = pydicom.dcmread(p)
        try:  # keep only the files pydicom can write back
            ds.save_as(io.BytesIO(), enforce_file_format=False)
        except Exception:
            continue
        datasets.append(ds)
    files = []
    for i in range(n):
        ds = datasets[i % len(datasets)]
        if i % 50 == 0:  # a new study every 50 instances, a new series every 10
            study = generate_uid()
        if i % 10 == 0:
            series = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        files.append(path)
    return files


def stow_all(api: HC, store: str, files: list[Path], per_request: int = 200) -> None:
    for i in range(0, len(files), per_request):
        r = api.stow(store, files[i:i + per_request])
        if r.status_code != 200:
            raise SystemExit(f"STOW failed: {r.status_code} {r.text[:500]}")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def timed_export(api: HC, svc, store: str, table: str) -> tuple[float, int, int]:
    """Seconds for one export, its success count, and the peak RSS growth (KiB) while it ran."""
    base = rss_kb(svc.proc.pid)
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_kb(svc.proc.pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": table, "writeDisposition": "WRITE_TRUNCATE"}})
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    if "error" in op:
        raise SystemExit(f"export failed: {op['error']}")
    return dt, int(op["metadata"]["counter"]["success"]), peak[0] - base


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        t0 = time.perf_counter()
        files = make_corpus(args.instances, tmp / "corpus")
        print(f"corpus: {len(files)} instances ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t0:.1f}s")
        svc = procs.healthcare_emulator(tmp, tmp / "hc").start()
        try:
            api = HC(svc.url)
            quarter, full, tiny = api.store(), api.store(), api.store()
            t0 = time.perf_counter()
            stow_all(api, quarter, files[: len(files) // 4])
            stow_all(api, full, files)
            stow_all(api, tiny, files[:50])
            n_stowed = len(files) + len(files) // 4
            print(f"stow: {n_stowed / (time.perf_counter() - t0):.0f} instances/s")
            import subprocess
            subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", "bench-project.bench",
                            "--data-dir", str(tmp / "hc")], check=True, capture_output=True)

            # baseline: header-only reads of the very files the emulator stored
            blobs = sorted((tmp / "hc" / "blobs").rglob("*.dcm"))
            t0 = time.perf_counter()
            for b in blobs:
                pydicom.dcmread(b, stop_before_pixels=True)
            read_rate = len(blobs) / (time.perf_counter() - t0)

            # each measured export runs in a fresh server process (same data dir), after a small warm-up
            # export that loads pyarrow and duckdb, so its peak RSS growth is the export's own working set
            results = {}
            for label, store in (("quarter", quarter), ("full", full)):
                svc.stop()
                svc = procs.healthcare_emulator(tmp, tmp / "hc", name=f"hc-{label}").start()
                api = HC(svc.url)
                timed_export(api, svc, tiny, "bq://bench-project.bench.warmup")
                results[label] = timed_export(api, svc, store, f"bq://bench-project.bench.{label}")
            (_, n_q, mem_q), (dt_f, n_f, mem_f) = results["quarter"], results["full"]
            export_rate = n_f / dt_f
            result = {
                "instances": n_f,
                "baseline_header_read_per_s": round(read_rate),
                "export_per_s": round(export_rate),
                "ratio": round(export_rate / read_rate, 2),
                "goal_ratio": 0.5,
                "peak_rss_growth_mib": {f"{n_q} instances": round(mem_q / 1024, 1),
                                        f"{n_f} instances": round(mem_f / 1024, 1)},
            }
            print(f"baseline pydicom header read: {read_rate:.0f} instances/s")
            print(f"export: {export_rate:.0f} instances/s = {export_rate / read_rate:.2f}x baseline (goal >= 0.5x)")
            print(f"export peak RSS growth: {mem_q / 1024:.1f} MiB for {n_q}, {mem_f / 1024:.1f} MiB for {n_f}")
            print(json.dumps(result))
        finally:
            svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
