"""BigQuery DML jobs and scripts on the emulator, through google-cloud-bigquery unchanged.

An emulator process of its own (module fixture); every test makes its own tables. Tables are
filled with query jobs (`destination` + WRITE_TRUNCATE / WRITE_APPEND, one Parquet file per job)
or with a DICOM export, then changed with `client.query(DML).result()` / `client.query_and_wait`.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pydicom
import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique

PROJECT = "dml-proj"


@pytest.fixture(scope="module")
def emu(logs_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hc-dml")
    svc = procs.healthcare_emulator(logs_dir, data_dir, name="healthcare-emulator-dml")
    svc.data_dir = data_dir
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def bq(emu):
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": emu.url})


@pytest.fixture
def ds(bq):
    name = unique("dml").replace("-", "_")
    bq.create_dataset(name)
    return f"{PROJECT}.{name}"


def fill(bq, table: str, first: int, last: int, disposition: str = "WRITE_TRUNCATE") -> None:
    """Rows k = first..last: SOPInstanceUID '1.2.3.<k>', StudyInstanceUID 's<k mod 5>' (one file per call)."""
    cfg = bigquery.QueryJobConfig(destination=table, write_disposition=disposition)
    bq.query(f"""SELECT CONCAT('1.2.3.', CAST(k AS STRING)) AS SOPInstanceUID,
                        CONCAT('s', CAST(MOD(k, 5) AS STRING)) AS StudyInstanceUID, k
                 FROM UNNEST(GENERATE_ARRAY({first}, {last})) AS k""", job_config=cfg).result()


def ks(bq, table: str) -> list[int]:
    return [r.k for r in bq.query_and_wait(f"SELECT k FROM `{table}` ORDER BY k")]


def manifest(emu, table: str) -> dict:
    project, dataset, name = table.split(".")
    path = emu.data_dir / "bigquery" / "projects" / project / "datasets" / dataset / "tables" / name / "manifest.json"
    return json.loads(path.read_text())


# -- DELETE ------------------------------------------------------------------------------------------
def test_delete_with_an_array_parameter_reports_the_rows_it_deleted(bq, ds):
    t = f"{ds}.t"
    fill(bq, t, 1, 100)
    uids = [f"1.2.3.{k}" for k in range(1, 11)] + ["1.2.3.999"]  # one the table never had
    job = bq.query(f"DELETE FROM `{t}` WHERE SOPInstanceUID IN UNNEST(@uids)",
                   job_config=bigquery.QueryJobConfig(query_parameters=[
                       bigquery.ArrayQueryParameter("uids", "STRING", uids)]))
    assert list(job.result()) == []
    assert job.statement_type == "DELETE"
    assert job.num_dml_affected_rows == 10
    assert job.dml_stats.deleted_row_count == 10 and job.dml_stats.inserted_row_count == 0
    q = job._properties["statistics"]["query"]  # the REST shape: int64 as strings
    assert q["numDmlAffectedRows"] == "10" and q["dmlStats"] == {"deletedRowCount": "10"}
    assert ks(bq, t) == list(range(11, 101))
    assert bq.get_table(t).num_rows == 90

    # jobs.query (query_and_wait), a scalar parameter, the table named through the default dataset
    rows = bq.query_and_wait("DELETE t AS x WHERE x.k > @k AND x.StudyInstanceUID = 's0'",
                             job_config=bigquery.QueryJobConfig(
                                 default_dataset=ds, query_parameters=[bigquery.ScalarQueryParameter("k", "INT64", 90)]))
    assert rows.num_dml_affected_rows == 2 and list(rows) == []  # k = 95, 100
    assert ks(bq, t) == [k for k in range(11, 101) if k not in (95, 100)]

    nothing = bq.query(f"DELETE FROM `{t}` WHERE k < 0")
    nothing.result()
    assert nothing.num_dml_affected_rows == 0
    assert bq.get_table(t).num_rows == 88


def test_delete_rewrites_only_the_files_holding_deleted_rows(emu, bq, ds):
    t = f"{ds}.t"
    fill(bq, t, 1, 1000)
    fill(bq, t, 1001, 2000, "WRITE_APPEND")
    fill(bq, t, 2001, 3000, "WRITE_APPEND")
    before = [f["name"] for f in manifest(emu, t)["files"]]
    assert len(before) == 3

    job = bq.query(f"DELETE FROM `{t}` WHERE k BETWEEN 1500 AND 1509")
    job.result()
    assert job.num_dml_affected_rows == 10
    after = manifest(emu, t)["files"]
    assert [f["name"] for f in after][0] == before[0] and [f["name"] for f in after][2] == before[2]
    assert after[1]["name"] != before[1] and after[1]["numRows"] == 990
    assert ks(bq, t) == [k for k in range(1, 3001) if not 1500 <= k <= 1509]
    # rows keep their order (tabledata.list reads the files in manifest order)
    listed = [r["k"] for r in bq.list_rows(t, selected_fields=[bigquery.SchemaField("k", "INTEGER")])]
    assert listed == [k for k in range(1, 3001) if not 1500 <= k <= 1509]

    job = bq.query(f"DELETE FROM `{t}` WHERE k > 2000")  # every row of the third file
    job.result()
    assert job.num_dml_affected_rows == 1000
    assert [f["name"] for f in manifest(emu, t)["files"]] == [before[0], after[1]["name"]]

    job = bq.query(f"DELETE FROM `{t}` WHERE true")
    job.result()
    assert job.num_dml_affected_rows == 1990
    table = bq.get_table(t)
    assert table.num_rows == 0 and [f.name for f in table.schema] == ["SOPInstanceUID", "StudyInstanceUID", "k"]
    assert ks(bq, t) == []


# -- INSERT ------------------------------------------------------------------------------------------
def test_insert_select_and_insert_values(bq, ds):
    src, t = f"{ds}.src", f"{ds}.t"
    fill(bq, src, 1, 20)
    bq.create_table(bigquery.Table(t, schema=[
        bigquery.SchemaField("SOPInstanceUID", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("k", "INTEGER"),
        bigquery.SchemaField("score", "FLOAT"),
        bigquery.SchemaField("tags", "STRING", mode="REPEATED"),
        bigquery.SchemaField("meta", "RECORD", fields=[bigquery.SchemaField("note", "STRING")]),
    ]))
    job = bq.query(f"INSERT INTO `{t}` (SOPInstanceUID, k, score) SELECT SOPInstanceUID, k, k FROM `{src}` "
                   "WHERE StudyInstanceUID = 's1'")
    job.result()
    assert job.statement_type == "INSERT"
    assert job.num_dml_affected_rows == 4 and job.dml_stats.inserted_row_count == 4  # k = 1, 6, 11, 16
    assert job._properties["statistics"]["query"]["dmlStats"] == {"insertedRowCount": "4"}

    rows = bq.query_and_wait(f"INSERT `{t}` VALUES ('x.1', 100, 0.5, ['a', 'b'], STRUCT('n' AS note)), "
                             "('x.2', NULL, NULL, [], NULL)")
    assert rows.num_dml_affected_rows == 2

    got = {r.SOPInstanceUID: r for r in bq.query_and_wait(f"SELECT * FROM `{t}`")}
    assert sorted(got) == ["1.2.3.1", "1.2.3.11", "1.2.3.16", "1.2.3.6", "x.1", "x.2"]
    assert got["1.2.3.6"].k == 6 and got["1.2.3.6"].score == 6.0  # INT64 inserted into FLOAT64
    assert got["1.2.3.6"].tags == [] and got["1.2.3.6"].meta is None  # columns not listed: NULL, [] if REPEATED
    assert got["x.1"].tags == ["a", "b"] and got["x.1"].meta == {"note": "n"}
    assert bq.get_table(t).num_rows == 6


@pytest.mark.parametrize("sql, message", [
    ("INSERT INTO `{t}` (SOPInstanceUID, k) VALUES ('a', 1, 2)", "Inserted row has wrong column count; Has 3, 2 expected"),
    ("INSERT INTO `{t}` (k) VALUES ('text')", "Query column 1 has type STRING which cannot be inserted into column k, "
                                            "which has type INT64"),
    ("INSERT INTO `{t}` (nope) VALUES (1)", "Column nope is not present in table"),
    ("INSERT INTO `{t}` (k) VALUES (1)", "Required field SOPInstanceUID cannot be null"),
    ("DELETE FROM `{t}` WHERE nope = 1", "Unrecognized name: nope"),
    ("DELETE FROM `{t}`", "DELETE must have a WHERE clause"),
    ("UPDATE `{t}` SET k = 1 WHERE true", "UPDATE statements are not supported"),
])
def test_bad_dml_is_an_invalid_query_naming_the_problem(bq, ds, sql, message):
    t = f"{ds}.t"
    bq.create_table(bigquery.Table(t, schema=[bigquery.SchemaField("SOPInstanceUID", "STRING", mode="REQUIRED"),
                                              bigquery.SchemaField("k", "INTEGER")]))
    job = bq.query(sql.format(t=t))
    with pytest.raises(gexc.BadRequest) as err:
        job.result()
    assert message in str(err.value)
    assert job.error_result["reason"] == "invalidQuery" and message in job.error_result["message"]
    assert bq.get_table(t).num_rows == 0


def test_dml_on_a_missing_table_or_dataset_is_not_found(bq, ds):
    job = bq.query(f"DELETE FROM `{ds}.missing` WHERE true")
    with pytest.raises(gexc.NotFound, match=f"Not found: Table {PROJECT}:{ds.split('.')[1]}.missing"):
        job.result()
    assert job.error_result["reason"] == "notFound"
    with pytest.raises(gexc.NotFound, match="Not found: Dataset"):  # jobs.query: the HTTP error itself
        bq.query_and_wait(f"INSERT INTO `{PROJECT}.no_such_dataset.t` (k) VALUES (1)")


# -- scripts and transactions ------------------------------------------------------------------------
def test_a_transaction_applies_every_statement_and_reports_each(bq, ds):
    t, staging = f"{ds}.t", f"{ds}.staging"
    fill(bq, t, 1, 50)
    fill(bq, staging, 41, 60)  # new versions of 41..50, and 51..60
    job = bq.query(f"""
        BEGIN TRANSACTION;
        DELETE FROM `{t}` WHERE SOPInstanceUID IN (SELECT SOPInstanceUID FROM `{staging}`);
        INSERT INTO `{t}` (SOPInstanceUID, StudyInstanceUID, k) SELECT SOPInstanceUID, 'new', k FROM `{staging}`;
        COMMIT TRANSACTION;""")
    job.result()
    assert job.statement_type == "SCRIPT"
    assert job.num_child_jobs == 4
    children = {c.statement_type: c for c in bq.list_jobs(parent_job=job)}
    assert set(children) == {"BEGIN_TRANSACTION", "DELETE", "INSERT", "COMMIT_TRANSACTION"}
    assert children["DELETE"].num_dml_affected_rows == 10
    assert children["INSERT"].num_dml_affected_rows == 20
    assert all(c.parent_job_id == job.job_id for c in children.values())
    assert ks(bq, t) == list(range(1, 61))
    studies = {r.k: r.StudyInstanceUID for r in bq.query_and_wait(f"SELECT k, StudyInstanceUID FROM `{t}`")}
    assert all(studies[k] == "new" for k in range(41, 61)) and studies[1] == "s1"

    # statements see the transaction's own changes; the last SELECT is the script's result
    rows = list(bq.query(f"""BEGIN; DELETE FROM `{t}` WHERE k <= 30;
                             SELECT COUNT(*) AS n FROM `{t}`; COMMIT;
                             SELECT COUNT(*) AS n, MIN(k) AS lo FROM `{t}`""").result())
    assert [(r.n, r.lo) for r in rows] == [(30, 31)]


def test_a_failing_statement_inside_a_transaction_changes_nothing(emu, bq, ds):
    t, other = f"{ds}.t", f"{ds}.other"
    fill(bq, t, 1, 30)
    fill(bq, other, 1, 5)
    before, generation = ks(bq, t), manifest(emu, t)["generation"]

    job = bq.query(f"""BEGIN TRANSACTION;
        DELETE FROM `{t}` WHERE k <= 10;
        DELETE FROM `{other}` WHERE true;
        INSERT INTO `{t}` (SOPInstanceUID, nope) VALUES ('z', 1);
        COMMIT TRANSACTION;""")
    with pytest.raises(gexc.BadRequest, match="Column nope is not present"):
        job.result()
    assert ks(bq, t) == before and manifest(emu, t)["generation"] == generation
    assert ks(bq, other) == [1, 2, 3, 4, 5]

    # a transaction left open at the end of the script is rolled back, and the job fails
    job = bq.query(f"BEGIN TRANSACTION; DELETE FROM `{t}` WHERE true;")
    with pytest.raises(gexc.BadRequest, match="Transaction was never committed"):
        job.result()
    assert ks(bq, t) == before
    # ROLLBACK undoes the transaction's statements
    bq.query(f"BEGIN; DELETE FROM `{t}` WHERE true; ROLLBACK TRANSACTION;").result()
    assert ks(bq, t) == before

    # outside a transaction each statement commits by itself, as in BigQuery: the first stays
    job = bq.query(f"DELETE FROM `{t}` WHERE k = 1; DELETE FROM `{t}` WHERE nope = 2;")
    with pytest.raises(gexc.BadRequest, match="Unrecognized name: nope"):
        job.result()
    assert ks(bq, t) == before[1:]


# -- atomicity and serialisation -----------------------------------------------------------------------
def test_readers_see_the_table_before_or_after_a_delete_never_between(bq, ds):
    t = f"{ds}.t"
    fill(bq, t, 1, 20_000)
    seen: set[int] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def read():
        try:
            while not stop.is_set():
                seen.add(next(iter(bq.query_and_wait(f"SELECT COUNT(*) AS n FROM `{t}`"))).n)
        except BaseException as e:  # surfaced below
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        for lo in range(1, 20_001, 4000):  # five deletes of 2,000 rows each, spread over the table
            bq.query(f"DELETE FROM `{t}` WHERE MOD(k, 2) = 0 AND k BETWEEN {lo} AND {lo + 3999}").result()
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not errors
    assert seen <= {20_000 - 2_000 * i for i in range(6)}
    assert bq.get_table(t).num_rows == 10_000


def test_dml_and_an_export_of_the_same_table_both_apply(emu, bq, ds, tmp_path):
    """A DELETE and a WRITE_APPEND export of the same table, at once: neither loses the other's rows."""
    api = HC(emu.url, project=PROJECT)
    t = f"{ds}.dicom"
    first = [dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / f"a{i}.dcm") for i in range(4)]
    second = [dicom_files.with_uids(dicom_files.path("MR_small.dcm"), tmp_path / f"b{i}.dcm") for i in range(3)]
    store_a, store_b = api.store(), api.store()
    assert api.stow(store_a, first).status_code == 200 and api.stow(store_b, second).status_code == 200
    op = api.export_and_wait(store_a, {"bigqueryDestination": {"tableUri": f"bq://{t}",
                                                               "writeDisposition": "WRITE_TRUNCATE"}})
    assert "error" not in op, op
    a_uids = [r.SOPInstanceUID for r in bq.query_and_wait(f"SELECT SOPInstanceUID FROM `{t}`")]
    assert len(a_uids) == 4

    def export(barrier, results):
        barrier.wait()
        results["export"] = api.export_and_wait(store_b, {"bigqueryDestination": {
            "tableUri": f"bq://{t}", "writeDisposition": "WRITE_APPEND"}})

    def delete(barrier, results, uid):
        barrier.wait()
        job = bq.query(f"DELETE FROM `{t}` WHERE SOPInstanceUID = @u", job_config=bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("u", "STRING", uid)]))
        job.result()
        results["delete"] = job.num_dml_affected_rows

    for _ in range(3):  # a few rounds, each with both writers started together
        barrier, results = threading.Barrier(2), {}
        threads = [threading.Thread(target=export, args=(barrier, results)),
                   threading.Thread(target=delete, args=(barrier, results, a_uids[-1]))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert "error" not in results["export"], results["export"]
        assert results["delete"] == 1
        a_uids.pop()
    uids = [r.SOPInstanceUID for r in bq.query_and_wait(f"SELECT SOPInstanceUID FROM `{t}`")]
    b_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in second]
    assert sorted(uids) == sorted(a_uids + 3 * b_uids)


def test_a_dry_run_of_dml_reports_the_statement_and_changes_nothing(bq, ds):
    t = f"{ds}.t"
    fill(bq, t, 1, 10)
    job = bq.query(f"DELETE FROM `{t}` WHERE k > 5", job_config=bigquery.QueryJobConfig(dry_run=True))
    assert job.statement_type == "DELETE" and job.num_dml_affected_rows is None
    assert ks(bq, t) == list(range(1, 11))
    with pytest.raises(gexc.NotFound, match="missing"):
        bq.query(f"DELETE FROM `{ds}.missing` WHERE true", job_config=bigquery.QueryJobConfig(dry_run=True))


def test_the_bq_cli_runs_dml_and_prints_the_affected_rows(emu, bq, ds, tmp_path):
    t = f"{ds}.t"
    fill(bq, t, 1, 10)
    token = tmp_path / "token"
    token.write_text("dummy-token\n")
    (tmp_path / "config").mkdir()
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "config"), "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token),
           "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
           "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"}
    r = subprocess.run(["bq", f"--api={emu.url}", f"--project_id={PROJECT}", "query", "--nouse_legacy_sql",
                        f"DELETE FROM `{t}` WHERE k <= 3"], env=env, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Number of affected rows: 3" in " ".join((r.stdout + r.stderr).split())
    assert ks(bq, t) == list(range(4, 11))


def test_concurrent_dml_jobs_on_one_table_are_serialised_and_all_apply(bq, ds):
    """Five jobs at once on one table (whose results do not depend on their order): every one applies."""
    t = f"{ds}.t"
    fill(bq, t, 1, 400)
    barrier = threading.Barrier(5)
    counts: dict[str, int | None] = {}

    def run(name: str, sql: str):
        barrier.wait()
        job = bq.query(sql)
        job.result()
        counts[name] = job.num_dml_affected_rows

    jobs = {f"delete{i}": f"DELETE FROM `{t}` WHERE k <= 400 AND MOD(k, 4) = {i}" for i in range(3)}
    jobs["insert"] = (f"INSERT INTO `{t}` (SOPInstanceUID, StudyInstanceUID, k) "
                      "SELECT CONCAT('9.', CAST(k AS STRING)), 'x', k FROM UNNEST(GENERATE_ARRAY(1001, 1050)) AS k")
    jobs["script"] = (f"BEGIN; DELETE FROM `{t}` WHERE k = 400; "
                      f"INSERT INTO `{t}` (SOPInstanceUID, k) VALUES ('z', 2000); COMMIT;")
    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert counts["insert"] == 50 and counts["delete1"] == counts["delete2"] == 100
    assert counts["delete0"] in (99, 100)  # k = 400 is the script's too: whichever ran first deleted it
    assert ks(bq, t) == [k for k in range(1, 401) if k % 4 == 3] + list(range(1001, 1051)) + [2000]
