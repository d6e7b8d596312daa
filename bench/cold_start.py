"""Benchmark: cold start of each deployed function against a hello-world function run the same way.

    python bench/cold_start.py [--runs 5] [--compare DIR] [--imports]

For each function: a fresh `functions-framework` process (bytecode compiled, PYTHONDONTWRITEBYTECODE
unset, as the cloud's build does), timed from process start until its first Pub/Sub push (or HTTP
request) is answered, against Google's Pub/Sub and Firestore emulators. Median of --runs. The ratio to
the hello-world baseline measured in the same run is the figure (goal <= 1.5x).

--compare DIR also times the functions of another checkout of the repo (say `git archive` of the commit
before a change, unpacked in DIR), interleaved with these in the same run, so that the machine's load hits
both alike. --imports (no timing) starts each function once under `python -X importtime` and lists what it
imports, up to its first event answered, beyond what the hello world imports: the module count and the sum
of their self times (noisy too, but far less than the wall-clock figure).
"""
from __future__ import annotations

import argparse
import base64
import compileall
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stack.services import firestore_emulator, free_port, pubsub_emulator  # noqa: E402

FF = str(Path(sys.executable).parent / "functions-framework")
STORE = "projects/bench-project/locations/us-central1/datasets/d/dicomStores/s"


def push_body(data: dict | bytes, attributes: dict | None = None) -> dict:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return {"message": {"data": base64.b64encode(raw).decode(), "attributes": attributes or {},
                        "messageId": str(time.time_ns()),
                        # now: an arrival published long ago would close an ingest batch by age at once
                        "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "subscription": "projects/bench-project/subscriptions/bench"}


def cases(root: Path = ROOT, suffix: str = "") -> list[tuple[str, str, str, dict | None, dict]]:
    """(label, source dir, target, push body or None for HTTP GET, extra env) of the checkout at `root`."""
    routes = json.dumps({STORE: "bq://bench-project.d.t"})
    src = str(root)
    return [
        # a request that is rejected still goes through the ledger and publishes an event
        ("export_request" + suffix, src, "export_request",
         push_body({"requestId": "cold", "bigqueryDestination": {"tableUri": "nope"}}), {}),
        ("poll_exports" + suffix, src, "poll_exports", push_body({"tick": True}), {}),
        ("export_status" + suffix, src, "export_status", None, {}),
        ("ingest_notification" + suffix, src, "ingest_notification",
         push_body(f"{STORE}/dicomWeb/studies/1.2/series/1.2.3/instances/1.2.3.4".encode()),
         # no batch closes (the arrivals of earlier runs never age out): no Cloud Storage write
         {"INGEST_ROUTES": routes, "INGEST_FILTER_BUCKET": "bench-filters", "INGEST_BATCH_MAX_AGE_S": "86400"}),
    ]


BASELINE = ("hello world (baseline)", str(ROOT / "bench" / "hello"), "hello", push_body({"x": 1}), {})


def one_start(source: str, target: str, body: dict | None, env: dict, importtime: Path | None = None) -> float:
    """Seconds from process start to the first event answered; with `importtime`, run under
    `python -X importtime` with its report written there."""
    port = free_port()
    sig = "http" if body is None else "cloudevent"
    python = [sys.executable, "-X", "importtime"] if importtime else []
    err = importtime.open("w") if importtime else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen([*python, FF, f"--target={target}", f"--source={source}/main.py",
                             f"--signature-type={sig}", "--host", "127.0.0.1", "--port", str(port)], cwd=source,
                            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{target} exited with {proc.returncode}")
            try:
                if body is None:
                    r = requests.get(f"http://127.0.0.1:{port}/", params={"requestId": "cold"}, timeout=30)
                else:
                    r = requests.post(f"http://127.0.0.1:{port}/projects/bench-project/topics/t", json=body,
                                      timeout=30)
                if r.status_code >= 500:
                    raise SystemExit(f"{target} answered {r.status_code}: {r.text[:300]}")
                return time.perf_counter() - t0
            except requests.ConnectionError:
                time.sleep(0.005)  # not listening yet: this is the cold start being measured
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        if importtime:
            err.close()


def imported(report: Path) -> dict[str, int]:
    """module -> its self time in microseconds, from a `-X importtime` report."""
    out = {}
    for line in report.read_text().splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| (\s*)(\S+)$", line)
        if m:
            out[m.group(3)] = int(m.group(1))
    return out


def imports_beyond_baseline(base_env: dict, tmp: Path, todo: list) -> None:
    """Print what each function imports beyond the hello world, up to its first event answered."""
    label, source, target, body, extra = BASELINE
    one_start(source, target, body, {**base_env, **extra}, tmp / "hello.txt")
    hello = imported(tmp / "hello.txt")
    # gunicorn's arbiter imports its control socket server (gunicorn.ctl, asyncio) beside the worker, sooner or
    # later than the first answer as the race falls: it is the server's, so it counts as the baseline's.
    with (tmp / "ctl.txt").open("w") as err:
        subprocess.run([sys.executable, "-X", "importtime", "-c", "import gunicorn.ctl.server"], stderr=err,
                       check=True, env=base_env)
    hello.update(imported(tmp / "ctl.txt"))
    summary = {}
    for label, source, target, body, extra in todo:
        one_start(source, target, body, {**base_env, **extra}, tmp / f"{target}.txt")
        extra_mods = {m: us for m, us in imported(tmp / f"{target}.txt").items() if m not in hello}
        ours = sorted(m for m in extra_mods if m.split(".")[0] in ("main", "config", "handlers"))
        others = sorted(m for m in extra_mods if m not in ours)
        ms = sum(extra_mods.values()) / 1000
        print(f"{label}: {len(extra_mods)} modules beyond the hello world, {ms:.1f} ms of import self time")
        print(f"  ours ({len(ours)}): {' '.join(ours)}")
        print(f"  others ({len(others)}): {' '.join(others)}")
        summary[label] = {"modules": len(extra_mods), "self_ms": round(ms, 1)}
    print(json.dumps(summary))


def warm_up(publisher, firestore_host: str) -> None:
    """One publish and one Firestore query before the first timed start: a fresh Java emulator answers
    its first calls slowly (seconds on a loaded machine), which is not the function's cold start."""
    publisher.publish("projects/bench-project/topics/dicom-export-events", b"{}").result(timeout=120)
    requests.post(f"http://{firestore_host}/v1/projects/bench-project/databases/(default)/documents:runQuery",
                  json={"structuredQuery": {"from": [{"collectionId": "warm-up"}], "limit": 1}},
                  headers={"Authorization": "Bearer owner"}, timeout=120).raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare", type=Path, help="another checkout of the repo, timed in the same run")
    ap.add_argument("--imports", action="store_true", help="list each function's imports instead of timing")
    args = ap.parse_args()
    roots = [ROOT] + ([args.compare.resolve()] if args.compare else [])
    for root in roots:
        compileall.compile_dir(str(root / "handlers"), quiet=1)
        compileall.compile_dir(str(root / "config"), quiet=1)
        compileall.compile_file(str(root / "main.py"), quiet=1)
    todo = cases() + (cases(roots[1], f" ({roots[1].name})") if args.compare else [])
    with tempfile.TemporaryDirectory() as tmp:
        ps, fs = pubsub_emulator(Path(tmp)).start(120), firestore_emulator(Path(tmp)).start(120)
        try:
            from google.cloud import pubsub_v1
            os.environ["PUBSUB_EMULATOR_HOST"] = ps.host_port
            pub = pubsub_v1.PublisherClient()
            for t in ("dicom-export-events", "dicom-export-requests"):
                pub.create_topic(name=f"projects/bench-project/topics/{t}")
            warm_up(pub, fs.host_port)
            base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            base_env.update({"PUBSUB_EMULATOR_HOST": ps.host_port, "FIRESTORE_EMULATOR_HOST": fs.host_port,
                             "GOOGLE_CLOUD_PROJECT": "bench-project", "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:9",
                             "GOOGLE_APPLICATION_CREDENTIALS": "", "ALLOWED_DICOM_STORES": "projects/*",
                             "ALLOWED_BQ_DATASETS": "*"})
            if args.imports:
                imports_beyond_baseline(base_env, Path(tmp), todo)
                return 0
            times: dict[str, list[float]] = {label: [] for label, *_ in [BASELINE, *todo]}
            for _ in range(args.runs):  # the cases interleaved, so that a change of the machine's load hits all
                for label, source, target, body, extra in [BASELINE, *todo]:
                    times[label].append(one_start(source, target, body, {**base_env, **extra}))
            results = {label: statistics.median(t) for label, t in times.items()}
            base = results[BASELINE[0]]
            print(f"cold start, median of {args.runs} (process start -> first event answered):")
            for label, t in results.items():
                print(f"  {label:<24} {t * 1000:7.0f} ms  {t / base:5.2f}x baseline")
            print(json.dumps({k: {"ms": round(v * 1000), "ratio": round(v / base, 2)} for k, v in results.items()}))
        finally:
            ps.stop()
            fs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
