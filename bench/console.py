"""Benchmark: the web console's two heavy pages against the REST calls they are built on, in one run.

    python bench/console.py [--operations 1000] [--rows 100000] [--repeat 15]

On one emulator process (over HTTP, as a browser and a REST client see it):
  - Operations: the time to render /console/operations for a dataset with 1,000 operations (90 % failed
    exports to a missing BigQuery dataset, 10 % succeeded), against the baseline: operations.list of the
    same dataset paged to the end (pageSize 100, its maximum).
  - SQL: the SQL page's round trip (POST /console/bigquery/query, rendering the results) on a 100,000-row
    table, against the baseline: jobs.query with the same SQL. Two queries: the documentation's example 2
    (GROUP BY StudyInstanceUID, 10 rows) and example 1 (a patient's DICOMweb paths, 100 rows).
Medians of --repeat runs after one warm-up; ratios = console / REST.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from healthcare_emulator.console.web import EXAMPLES  # noqa: E402
from stack import dicom_files  # noqa: E402
from stack import services as procs  # noqa: E402
from stack.hcapi import HC  # noqa: E402

PROJECT = "bench-project"


def median_s(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--operations", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        tmp = Path(tmp)
        svc = procs.healthcare_emulator(tmp, tmp / "hc", "--export-workers", "0").start()
        try:
            base = svc.url
            api = HC(base, project=PROJECT)
            store = api.store()
            dataset = store.split("/dicomStores/")[0]
            one = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp / "one.dcm")
            assert api.stow(store, [one]).status_code == 200
            requests.post(f"{base}/bigquery/v2/projects/{PROJECT}/datasets", timeout=30, json={
                "datasetReference": {"projectId": PROJECT, "datasetId": "bench"}}).raise_for_status()

            # -- 1,000 operations ------------------------------------------------------------------------
            t0 = time.perf_counter()
            names = []
            for i in range(args.operations):
                ok = i % 10 == 0
                table = f"bq://{PROJECT}.{'bench' if ok else 'missing'}.ops"
                r = api.export(store, {"bigqueryDestination": {"tableUri": table, "writeDisposition": "WRITE_APPEND"}})
                r.raise_for_status()
                names.append(r.json()["name"])
            for n in names:
                api.wait(n)
            print(f"setup: {args.operations} exports done in {time.perf_counter() - t0:.1f} s")
            http = requests.Session()

            def rest_list():
                ops, token = [], None
                while True:
                    p = {"pageSize": 100, **({"pageToken": token} if token else {})}
                    page = http.get(f"{base}/v1/{dataset}/operations", params=p, timeout=60).json()
                    ops += page.get("operations", [])
                    token = page.get("nextPageToken")
                    if not token:
                        return ops

            def console_ops():
                r = http.get(f"{base}/console/operations", params={"dataset": dataset}, timeout=60)
                r.raise_for_status()
                return r.text

            n_rest = len(rest_list())
            n_console = console_ops().count('<tr class="op')
            assert n_rest == n_console == args.operations + 1, (n_rest, n_console)  # + the dataset's creation
            rest_s = median_s(rest_list, args.repeat)
            console_s = median_s(console_ops, args.repeat)
            result = {"operations": n_rest, "rest_list_ms": round(rest_s * 1000, 1),
                      "console_operations_ms": round(console_s * 1000, 1), "ratio": round(console_s / rest_s, 2)}
            print(f"Operations page, {n_rest} operations: console {console_s * 1000:.0f} ms, operations.list "
                  f"(all pages) {rest_s * 1000:.0f} ms: {console_s / rest_s:.2f}x")

            # -- a 100,000-row table ---------------------------------------------------------------------
            table = f"{PROJECT}.bench.rows"
            make = (f"SELECT CONCAT('1.2.826.0.1.3680043.8.498.', CAST(DIV(x, 10) AS STRING)) AS StudyInstanceUID, "
                    f"CONCAT('1.2.826.0.1.3680043.8.498.', CAST(DIV(x, 10) AS STRING), '.1') AS SeriesInstanceUID, "
                    f"CONCAT('1.2.826.0.1.3680043.8.498.', CAST(x AS STRING), '.1.1') AS SOPInstanceUID, "
                    f"IF(MOD(x, 1000) = 0, '19045', CONCAT('p', CAST(DIV(x, 50) AS STRING))) AS PatientID, "
                    f"DATE_ADD(DATE '2020-01-01', INTERVAL MOD(x, 1500) DAY) AS StudyDate, "
                    f"TIME_ADD(TIME '08:00:00', INTERVAL MOD(x, 36000) SECOND) AS StudyTime "
                    f"FROM UNNEST(GENERATE_ARRAY(1, {args.rows})) AS x")
            r = http.post(f"{base}/bigquery/v2/projects/{PROJECT}/jobs", timeout=600, json={"configuration": {"query": {
                "query": make, "useLegacySql": False, "writeDisposition": "WRITE_TRUNCATE",
                "destinationTable": {"projectId": PROJECT, "datasetId": "bench", "tableId": "rows"}}}})
            r.raise_for_status()
            assert "errorResult" not in r.json().get("status", {}), r.json()["status"]
            n_rows = int(http.get(f"{base}/bigquery/v2/projects/{PROJECT}/datasets/bench/tables/rows",
                                  timeout=60).json()["numRows"])
            assert n_rows == args.rows, n_rows
            page = http.get(f"{base}/console/bigquery/query", params={"ref": table}, timeout=60).text
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
            sql_results = {}
            for key in ("2", "1"):
                sql = EXAMPLES[key][1].format(table=table)

                def rest_query(sql=sql):
                    a = http.post(f"{base}/bigquery/v2/projects/{PROJECT}/queries", timeout=600,
                                  json={"query": sql, "useLegacySql": False, "maxResults": 1000}).json()
                    return int(a["totalRows"])

                def console_query(sql=sql):
                    r = http.post(f"{base}/console/bigquery/query", timeout=600, headers={"Origin": base},
                                  data={"csrf": token, "ref": table, "sql": sql})
                    r.raise_for_status()
                    return r.text

                n = rest_query()
                shown = console_query().count("<tr><td")
                assert shown == n > 0, (shown, n)
                rest_s = median_s(rest_query, args.repeat)
                console_s = median_s(console_query, args.repeat)
                sql_results[f"example{key}"] = {"result_rows": n, "rest_ms": round(rest_s * 1000, 1),
                                                "console_ms": round(console_s * 1000, 1),
                                                "ratio": round(console_s / rest_s, 2)}
                print(f"SQL page, example {key} on {n_rows:,} rows ({n} result rows): console "
                      f"{console_s * 1000:.0f} ms, jobs.query {rest_s * 1000:.0f} ms: {console_s / rest_s:.2f}x")
            result["sql"] = sql_results
            print(json.dumps(result))
        finally:
            svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
