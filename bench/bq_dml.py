"""Benchmark: deleting rows by a BigQuery DML job against rewriting the whole table, on the emulator.

    python bench/bq_dml.py [--rows 100000] [--delete 1000] [--files 20] [--rounds 3]

An emulator process of its own; everything goes through google-cloud-bigquery, unchanged. Two
identical tables of `--rows` DICOM-like rows (UIDs, patient, dates, numbers, a REPEATED column) are
built with `--files` query jobs each (`WRITE_APPEND`: one Parquet file per job, as a routed table
grows one export batch at a time). Then, for each of three deletion patterns, `--delete` rows go:

  - dml:      `DELETE FROM t WHERE SOPInstanceUID IN UNNEST(@uids)` (an ARRAY<STRING> parameter);
  - rewrite:  a query job `SELECT * FROM t WHERE SOPInstanceUID NOT IN UNNEST(@uids)` with
              `destination = t, WRITE_TRUNCATE`: the same result, the whole table rewritten.

Patterns: `studies` (whole studies of the most recent batch: what deleting a few studies costs),
`spread` (rows drawn at random over the whole table: every file is touched) and `one-file` (a table
of one file). Each measurement is repeated `--rounds` times, alternating the order; printed: the
median seconds of each and the ratio rewrite / dml, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import services as procs  # noqa: E402

PROJECT = "bench-project"
INSTANCES_PER_STUDY = 100


def client(url: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def rows_sql(first: int, last: int) -> str:
    """Rows k = first..last: instance k of study k // 100, series k // 10."""
    return f"""
        SELECT CONCAT('1.2.826.0.1.3680043.8.498.', CAST(k AS STRING)) AS SOPInstanceUID,
               CONCAT('1.2.826.0.1.3680043.8.498.9.', CAST(DIV(k, 10) AS STRING)) AS SeriesInstanceUID,
               CONCAT('1.2.826.0.1.3680043.8.498.8.', CAST(DIV(k, {INSTANCES_PER_STUDY}) AS STRING)) AS StudyInstanceUID,
               CONCAT('PAT-', CAST(MOD(k, 997) AS STRING)) AS PatientID,
               CASE MOD(k, 3) WHEN 0 THEN 'CT' WHEN 1 THEN 'MR' ELSE 'US' END AS Modality,
               DATE_ADD(DATE '2020-01-01', INTERVAL MOD(k, 1500) DAY) AS StudyDate,
               MOD(k, 10) + 1 AS InstanceNumber,
               0.5 + MOD(k, 7) AS SliceThickness,
               ['ORIGINAL', 'PRIMARY', CASE MOD(k, 2) WHEN 0 THEN 'AXIAL' ELSE 'LOCALIZER' END] AS ImageType,
               CONCAT('Series description ', CAST(DIV(k, 10) AS STRING)) AS SeriesDescription
        FROM UNNEST(GENERATE_ARRAY({first}, {last})) AS k"""


def build(bq, table: str, rows: int, files: int) -> None:
    from google.cloud import bigquery
    per = rows // files
    for i in range(files):
        last = rows - 1 if i == files - 1 else (i + 1) * per - 1
        cfg = bigquery.QueryJobConfig(destination=table,
                                      write_disposition="WRITE_TRUNCATE" if i == 0 else "WRITE_APPEND")
        bq.query(rows_sql(i * per, last), job_config=cfg).result()
    assert bq.get_table(table).num_rows == rows


def uid(k: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{k}"


def dml(bq, table: str, uids: list[str]) -> float:
    from google.cloud import bigquery
    t0 = time.perf_counter()
    job = bq.query(f"DELETE FROM `{table}` WHERE SOPInstanceUID IN UNNEST(@uids)",
                   job_config=bigquery.QueryJobConfig(query_parameters=[
                       bigquery.ArrayQueryParameter("uids", "STRING", uids)]))
    job.result()
    dt = time.perf_counter() - t0
    assert job.num_dml_affected_rows == len(uids), job.num_dml_affected_rows
    return dt


def rewrite(bq, table: str, uids: list[str]) -> float:
    from google.cloud import bigquery
    before = bq.get_table(table).num_rows
    t0 = time.perf_counter()
    bq.query(f"SELECT * FROM `{table}` WHERE SOPInstanceUID NOT IN UNNEST(@uids)",
             job_config=bigquery.QueryJobConfig(
                 destination=table, write_disposition="WRITE_TRUNCATE",
                 query_parameters=[bigquery.ArrayQueryParameter("uids", "STRING", uids)])).result()
    dt = time.perf_counter() - t0
    assert bq.get_table(table).num_rows == before - len(uids)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--delete", type=int, default=1000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(13)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        svc = procs.healthcare_emulator(tmp, tmp / "hc", name="hc-bench-dml").start()
        try:
            bq = client(svc.url)
            bq.create_dataset("bench")
            results = {}
            patterns = {"studies": args.files, "spread": args.files, "one-file": 1}
            for pattern, files in patterns.items():
                times = {"dml": [], "rewrite": []}
                for r in range(args.rounds):
                    tables = {"dml": f"{PROJECT}.bench.{pattern.replace('-', '_')}_dml_{r}",
                              "rewrite": f"{PROJECT}.bench.{pattern.replace('-', '_')}_rewrite_{r}"}
                    t0 = time.perf_counter()
                    for t in tables.values():
                        build(bq, t, args.rows, files)
                    build_s = time.perf_counter() - t0
                    if pattern == "studies":  # whole studies of the last batch written
                        last_start = (args.files - 1) * (args.rows // args.files)
                        study0 = last_start // INSTANCES_PER_STUDY + 1
                        ks = [k for s in range(study0, study0 + args.delete // INSTANCES_PER_STUDY)
                              for k in range(s * INSTANCES_PER_STUDY, (s + 1) * INSTANCES_PER_STUDY)]
                    else:
                        ks = rng.sample(range(args.rows), args.delete)
                    uids = [uid(k) for k in ks]
                    order = ("dml", "rewrite") if r % 2 == 0 else ("rewrite", "dml")
                    for kind in order:
                        times[kind].append((dml if kind == "dml" else rewrite)(bq, tables[kind], uids))
                    for t in tables.values():
                        bq.delete_table(t)
                    print(f"{pattern} round {r + 1}: dml {times['dml'][-1]:.3f}s, rewrite "
                          f"{times['rewrite'][-1]:.3f}s (tables built in {build_s:.1f}s)", flush=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                results[pattern] = {"files": files, "dml_s": round(med["dml"], 3),
                                    "rewrite_s": round(med["rewrite"], 3),
                                    "ratio_rewrite_over_dml": round(med["rewrite"] / med["dml"], 1)}
            print()
            for pattern, res in results.items():
                print(f"delete {args.delete} of {args.rows} rows, {pattern} ({res['files']} file(s)): DML "
                      f"{res['dml_s']:.3f}s, WRITE_TRUNCATE rewrite {res['rewrite_s']:.3f}s, "
                      f"ratio {res['ratio_rewrite_over_dml']}x (medians of {args.rounds})")
            print(json.dumps({"rows": args.rows, "delete": args.delete, "rounds": args.rounds, **results}))
        finally:
            svc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
