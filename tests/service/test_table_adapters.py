"""The BigQuery and DICOMweb adapters of deletions and reconcile, against the Healthcare emulator."""
from __future__ import annotations

import pydicom
import pytest

from handlers.adapters.bigquery import BigQuery, TableError
from handlers.adapters.dicomweb import DicomWeb
from handlers.core import changes as C
from handlers.core import reconcile as R
from tests.support.dicom_files import path, with_uids
from tests.support.function import PROJECT
from tests.support.hcapi import HC, unique
from tests.support.ingest import bq_mk


@pytest.fixture(scope="module")
def exported(hc, tmp_path_factory):
    """A store of 2 studies (3 + 1 instances) exported to a table; (store, table URI, [(study, series, sop)])."""
    api = HC(hc.url)
    store = api.store()
    tmp = tmp_path_factory.mktemp("dcm")
    uids = []
    for i, study in enumerate(["1.2.826.0.1.77.1", "1.2.826.0.1.77.1", "1.2.826.0.1.77.1", "1.2.826.0.1.77.2"]):
        f = with_uids(path("CT_small.dcm"), tmp / f"{i}.dcm", study=study)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        assert api.stow(store, [f]).status_code == 200
    dataset = f"{PROJECT}.adapters_{unique('t').replace('-', '_')}"
    bq_mk(hc.data_dir, dataset)
    table = f"bq://{dataset}.instances"
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": table}})
    assert "error" not in op, op
    return store, table, uids


def test_tables_get_and_a_grouped_query(hc, exported):
    _, table, uids = exported
    bq = BigQuery(hc.url, PROJECT)
    assert R.missing_columns(bq.table(table)["schema"]["fields"]) == []
    got = bq.query(R.study_counts_sql(table, only_studies=False))
    assert sorted((s, int(n), int(d)) for s, n, d in got.rows) == [("1.2.826.0.1.77.1", 3, 3),
                                                                    ("1.2.826.0.1.77.2", 1, 1)]
    assert got.calls >= 1 and got.job_id
    only = bq.query(R.study_counts_sql(table, only_studies=True), [C.string_array("studies", ["1.2.826.0.1.77.2"])])
    assert [r[0] for r in only.rows] == ["1.2.826.0.1.77.2"]


def test_a_missing_table_is_a_table_error_naming_the_reason(hc, exported):
    _, table, _ = exported
    with pytest.raises(TableError, match="404"):
        BigQuery(hc.url, PROJECT).table(table + "_nope")


def test_qido_studies_with_counts_paged_and_by_uid_list_and_instances(hc, exported):
    store, _, uids = exported
    web = DicomWeb(hc.url)
    assert web.studies(store, offset=0, limit=1) == [("1.2.826.0.1.77.1", 3)]
    assert web.studies(store, offset=1, limit=1) == [("1.2.826.0.1.77.2", 1)]
    assert web.studies(store, offset=2, limit=1) == []
    assert web.studies(store, offset=0, limit=10, uids=["1.2.826.0.1.77.2", "1.2.9"]) == [("1.2.826.0.1.77.2", 1)]
    assert sorted(web.instances(store, "1.2.826.0.1.77.1")) == sorted((se, sop) for _, se, sop in uids[:3])
    _, series, sop = uids[1]
    assert web.instances(store, "1.2.826.0.1.77.1", series) == [(series, sop)]
    assert sorted(web.series(store, "1.2.826.0.1.77.1")) == sorted((se, 1) for _, se, _ in uids[:3])
    assert web.calls == 7


def test_the_batch_delete_statement_removes_exactly_the_planned_rows(hc, exported):
    store, table, uids = exported
    copy = table + "_dml"
    assert "error" not in HC(hc.url).export_and_wait(store, {"bigqueryDestination": {"tableUri": copy}})
    bq = BigQuery(hc.url, PROJECT)
    plan = C.Plan(sops=(uids[0][2], "1.2.3.404"), series=(), studies=("1.2.826.0.1.77.2",), export_paths=())
    got = bq.query(C.delete_statement(copy), C.parameters(plan))
    assert got.affected == 2 and got.rows == []
    left = bq.query(f"SELECT SOPInstanceUID FROM {C.table_sql_name(copy)}")
    assert sorted(r[0] for r in left.rows) == sorted(u[2] for u in uids[1:3])
    assert bq.query(C.delete_statement(copy), C.parameters(plan)).affected == 0  # again: nothing left to delete


def test_run_once_runs_one_job_per_id_whoever_submits_it(hc, exported):
    store, table, uids = exported
    copy = table + "_once"
    assert "error" not in HC(hc.url).export_and_wait(store, {"bigqueryDestination": {"tableUri": copy}})
    bq = BigQuery(hc.url, PROJECT)
    plan = C.Plan(sops=(uids[0][2],), series=(), studies=(), export_paths=())
    job = f"test_{unique('job').replace('-', '_')}"
    first = bq.run_once(C.delete_statement(copy), C.parameters(plan), job, table_uri=copy)
    assert (first.affected, first.job_id) == (1, job)
    t = C.table_sql_name(copy)
    one = [C.string_array("s", [uids[0][2]])]
    bq.query(f"INSERT INTO {t} SELECT * FROM {C.table_sql_name(table)} WHERE SOPInstanceUID IN UNNEST(@s)", one)
    again = bq.run_once(C.delete_statement(copy), C.parameters(plan), job, table_uri=copy)  # e.g. a late copy
    assert again.affected == 1  # the first job's count: nothing deleted a second time
    assert len(bq.query(f"SELECT 1 FROM {t} WHERE SOPInstanceUID IN UNNEST(@s)", one).rows) == 1
