"""Benchmark: dicomStores.import from Cloud Storage against STOW-RS of the same files; streaming delay.

    python bench/emulator_import.py [--instances 20000] [--streamed 100]

A corpus is made as bench/emulator_export.py makes it (pydicom's bundled files re-written with fresh UIDs)
and uploaded to a fake-gcs-server bucket. Printed, from the same run:
  - STOW-RS: the files into one store, 200 per request, one client (instances/s)
  - import: the same files from `gs://bucket/corpus/**` into another store (instances/s from the import call
    to the operation's end)
  - import memory: the emulator's peak RSS growth (server process) while importing a quarter of the corpus
    and all of it, each into an empty store of a fresh server process after a small warm-up import (must
    not grow with the corpus)
  - streaming delay: STOW of one instance at a time into a store with a streamConfig, until its row is
    counted by the table (median and 95th percentile, milliseconds)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.emulator_export import make_corpus, rss_kb, stow_all  # noqa: E402
from tests.support import procs  # noqa: E402
from tests.support.hcapi import HC  # noqa: E402

PROJECT = "bench-project"


def upload(gcs_url: str, bucket_name: str, files: list[Path], prefix: str) -> None:
    os.environ["STORAGE_EMULATOR_HOST"] = gcs_url
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client(project="bench", credentials=AnonymousCredentials())
    bucket = client.lookup_bucket(bucket_name) or client.create_bucket(bucket_name)

    def one(f: Path) -> None:
        bucket.blob(f"{prefix}/{f.name}").upload_from_filename(str(f))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, files))


def timed_import(api: HC, svc, store: str, uri: str) -> tuple[float, int, int]:
    """Seconds for one import, its success count, and the peak RSS growth (KiB) while it ran."""
    base = rss_kb(svc.proc.pid)
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_kb(svc.proc.pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    r = api.post(f"{store}:import", json={"gcsSource": {"uri": uri}})
    if r.status_code != 200:
        raise SystemExit(f"import failed: {r.status_code} {r.text[:500]}")
    op = api.wait(r.json()["name"], timeout=3600)
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    if "error" in op:
        raise SystemExit(f"import failed: {op['error']}")
    return dt, int(op["metadata"]["counter"].get("success", 0)), peak[0] - base


def streaming_delays(api: HC, svc, files: list[Path], tmp: Path) -> list[float]:
    """Seconds from the start of each single-instance STOW to its row being counted in the stream table."""
    table = f"{PROJECT}.bench.streamed"
    store = api.store(body={"streamConfigs": [{"bigqueryDestination": {"tableUri": f"bq://{table}"}}]})
    url = f"{svc.url}/bigquery/v2/projects/{PROJECT}/datasets/bench/tables/streamed"
    http = requests.Session()

    def rows() -> int:
        r = http.get(url, timeout=10)
        return int(r.json().get("numRows", 0)) if r.status_code == 200 else 0

    delays = []
    for n, f in enumerate(files, 1):
        t0 = time.perf_counter()
        if api.stow(store, [f]).status_code != 200:
            raise SystemExit("STOW failed")
        deadline = t0 + 30
        while rows() < n:
            if time.perf_counter() > deadline:
                raise SystemExit(f"instance {n} not streamed after 30 s")
            time.sleep(0.002)  # poll interval
        delays.append(time.perf_counter() - t0)
    return delays


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--streamed", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        t0 = time.perf_counter()
        files = make_corpus(args.instances, tmp / "corpus")
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus: {len(files)} instances ({mb:.0f} MB) in {time.perf_counter() - t0:.1f}s")
        gcs = procs.gcs_emulator(tmp, tmp / "gcs").start()
        svc = None
        try:
            quarter = files[: len(files) // 4]
            t0 = time.perf_counter()
            upload(gcs.url, "bench-import", quarter, "quarter")
            upload(gcs.url, "bench-import", files, "full")
            upload(gcs.url, "bench-import", files[:50], "tiny")
            print(f"upload to fake-gcs-server: {time.perf_counter() - t0:.1f}s")
            env = {"STORAGE_EMULATOR_HOST": gcs.url}
            results = {}
            # Each measured import runs in a fresh server process (same data dir) after a small warm-up
            # import, so its peak RSS growth is the import's own working set.
            for label in ("quarter", "full"):
                if svc is not None:
                    svc.stop()
                svc = procs.healthcare_emulator(tmp, tmp / "hc", env=env, name=f"hc-import-{label}").start()
                api = HC(svc.url, project=PROJECT)
                timed_import(api, svc, api.store(), "gs://bench-import/tiny/**")
                results[label] = timed_import(api, svc, api.store(), f"gs://bench-import/{label}/**")
            (_, n_q, mem_q), (dt_f, n_f, mem_f) = results["quarter"], results["full"]
            if n_f != len(files) or n_q != len(quarter):
                raise SystemExit(f"import counted {n_q} and {n_f} successes")

            # STOW-RS of the very same files, same server, same run.
            stow_store = api.store()
            t0 = time.perf_counter()
            stow_all(api, stow_store, files)
            stow_rate = len(files) / (time.perf_counter() - t0)
            import_rate = n_f / dt_f

            import subprocess
            subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{PROJECT}.bench",
                            "--data-dir", str(tmp / "hc")], check=True, capture_output=True)
            streamed = make_corpus(args.streamed, _mkdir(tmp / "streamed"))
            delays = streaming_delays(api, svc, streamed, tmp)
            delays_ms = sorted(d * 1000 for d in delays)
            p50 = statistics.median(delays_ms)
            p95 = delays_ms[min(len(delays_ms) - 1, int(len(delays_ms) * 0.95))]
            result = {
                "instances": n_f, "stow_per_s": round(stow_rate), "import_per_s": round(import_rate),
                "import_vs_stow": round(import_rate / stow_rate, 2),
                "import_peak_rss_growth_mib": {f"{n_q} instances": round(mem_q / 1024, 1),
                                               f"{n_f} instances": round(mem_f / 1024, 1)},
                "streaming_delay_ms": {"instances": len(delays), "median": round(p50), "p95": round(p95),
                                       "max": round(delays_ms[-1])},
            }
            print(f"STOW-RS: {stow_rate:.0f} instances/s")
            print(f"import:  {import_rate:.0f} instances/s = {import_rate / stow_rate:.2f}x STOW-RS")
            print(f"import peak RSS growth: {mem_q / 1024:.1f} MiB for {n_q}, {mem_f / 1024:.1f} MiB for {n_f}")
            print(f"streaming delay STOW -> row: median {p50:.0f} ms, p95 {p95:.0f} ms over {len(delays)} "
                  "instances (each includes its STOW call)")
            print(json.dumps(result))
        finally:
            if svc is not None:
                svc.stop()
            gcs.stop()
    return 0


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    sys.exit(main())
