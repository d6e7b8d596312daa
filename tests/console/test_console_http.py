"""The console without a browser, on the emulator's real WSGI app in-process: escaping, the same-origin
token, GETs that change nothing, BigQuery's table naming rules (server side)."""
from __future__ import annotations

import re
import uuid

import pytest
from werkzeug.test import Client

from healthcare_emulator.console import names
from healthcare_emulator.console.web import operation_view
from healthcare_emulator.server import Options, create_app
from tests.support import dicom_files

PROJECT = "test-project"
PARENT = f"projects/{PROJECT}/locations/us-central1"
DATASET = f"{PARENT}/datasets/ds"
STORE = f"{DATASET}/dicomStores/s"
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-http")
    app = create_app(tmp / "data", Options(export_workers=0))
    c = Client(app)
    assert c.post(f"/v1/{PARENT}/datasets?datasetId=ds", json={}).status_code == 200
    assert c.post(f"/v1/{DATASET}/dicomStores?dicomStoreId=s", json={}).status_code == 200
    f = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp / "x.dcm", PatientName=XSS, PatientID="19045")
    b = uuid.uuid4().hex
    body = f"--{b}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + f"\r\n--{b}--\r\n".encode()
    r = c.post(f"/v1/{STORE}/dicomWeb/studies", data=body,
               headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'})
    assert r.status_code == 200
    r = c.post(f"/bigquery/v2/projects/{PROJECT}/datasets",
               json={"datasetReference": {"projectId": PROJECT, "datasetId": "bq"}})
    assert r.status_code == 200
    return app


@pytest.fixture
def client(emulator):
    return Client(emulator)  # a browser of its own: its own cookie


def token(client: Client, path: str = f"/console/export?store={STORE}&project={PROJECT}") -> str:
    r = client.get(path)
    assert r.status_code == 200
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', r.get_data(as_text=True)).group(1)


def export_form(tok: str | None, table: str = "t", disposition: str = "WRITE_TRUNCATE") -> dict:
    form = {"store": STORE, "project": PROJECT, "bq_dataset": "bq", "table": table, "write_disposition": disposition}
    if tok is not None:
        form["csrf"] = tok
    return form


def operations(client: Client) -> list[dict]:
    return client.get(f"/v1/{DATASET}/operations").get_json().get("operations", [])


def settled(client: Client) -> list[dict]:
    """The dataset's operations once every one of them is done (an export another test started may still run)."""
    for op in operations(client):
        if not op.get("done"):
            assert client.get(f"/emulator/wait/{op['name']}").get_json()["done"]
    return operations(client)


def exported(client: Client, table: str = "t") -> None:
    r = client.post("/console/export", data=export_form(token(client), table))
    assert r.status_code == 303, r.get_data(as_text=True)
    op = re.search(r"started=([^&]+)", r.headers["Location"]).group(1).replace("%2F", "/")
    assert client.get(f"/emulator/wait/{op}").get_json()["done"]


def test_an_export_post_without_the_token_is_403_and_starts_nothing(client):
    before = len(operations(client))
    token(client)  # the browser has its cookie, but the form lacks the token
    r = client.post("/console/export", data=export_form(None))
    assert r.status_code == 403 and "token" in r.get_data(as_text=True)
    r = client.post("/console/export", data=export_form("0" * 64))
    assert r.status_code == 403
    assert len(operations(client)) == before


def test_a_token_from_another_browser_or_another_site_is_refused(emulator, client):
    other = Client(emulator)
    stolen = token(other)
    token(client)
    before = len(operations(client))
    assert client.post("/console/export", data=export_form(stolen)).status_code == 403
    own = token(client)
    r = client.post("/console/export", data=export_form(own), headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    r = client.post("/console/export", data=export_form(own), headers={"Referer": "http://evil.example/x"})
    assert r.status_code == 403
    r = client.post("/console/bigquery/query", data={"sql": "SELECT 1"})
    assert r.status_code == 403
    assert len(operations(client)) == before
    # ...and the same token, from this browser and this origin, starts the export.
    r = client.post("/console/export", data=export_form(own), headers={"Origin": "http://localhost"})
    assert r.status_code == 303
    assert len(operations(client)) == before + 1


def test_no_get_changes_anything(client):
    exported(client)
    before_ops = settled(client)
    before_counts = client.get("/emulator/requestCounts").get_json()
    before_tables = client.get(f"/bigquery/v2/projects/{PROJECT}/datasets/bq/tables").get_json()
    gets = ["/console", "/console/datasets", f"/console/dataset?name={DATASET}", f"/console/operations?dataset={DATASET}",
            f"/console/export?store={STORE}&project={PROJECT}&bq_dataset=bq&table=t2&write_disposition=WRITE_APPEND",
            "/console/export?" + "&".join(f"{k}={v}" for k, v in export_form(token(client), "t3").items()),
            f"/console/bigquery?project={PROJECT}", f"/console/bigquery/table?ref={PROJECT}.bq.t",
            f"/console/bigquery/query?ref={PROJECT}.bq.t&example=1",
            f"/console/bigquery/query?sql=DROP+TABLE+%60{PROJECT}.bq.t%60", "/console/service"]
    for path in gets:
        assert client.get(path).status_code == 200, path
    assert operations(client) == before_ops
    assert client.get("/emulator/requestCounts").get_json() == before_counts
    assert client.get(f"/bigquery/v2/projects/{PROJECT}/datasets/bq/tables").get_json() == before_tables


def test_untrusted_values_are_escaped_everywhere(client):
    exported(client, "esc")
    html = client.get(f"/console/bigquery/table?ref={PROJECT}.bq.esc").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and XSS not in html
    tok = token(client, f"/console/bigquery/query?ref={PROJECT}.bq.esc")
    r = client.post("/console/bigquery/query", data={"csrf": tok, "ref": f"{PROJECT}.bq.esc",
                                                    "sql": f"SELECT PatientID, '{XSS}' AS x FROM `{PROJECT}.bq.esc`"})
    html = r.get_data(as_text=True)
    assert r.status_code == 200 and html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2 and XSS not in html
    r = client.post("/console/bigquery/query", data={"csrf": tok, "sql": f"SELECT * FROM `{PROJECT}.bq.{XSS}`"})
    html = r.get_data(as_text=True)
    assert r.status_code == 400 and "&lt;script&gt;" in html and XSS not in html
    # A name in the URL is echoed escaped in the error page.
    html = client.get(f"/console/dataset?name={XSS}").get_data(as_text=True)
    assert "&lt;script&gt;" in html and XSS not in html


def test_pages_carry_a_strict_content_security_policy_and_load_only_their_own_assets(client):
    r = client.get("/console/datasets")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    html = r.get_data(as_text=True)
    assert re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html) == ["/console/static/console.css",
                                                                      "/console/static/console.js"]
    for asset in ("console.css", "console.js"):
        assert client.get(f"/console/static/{asset}").status_code == 200
    assert client.get("/console/static/../web.py").status_code == 404
    assert client.get("/console/nowhere").status_code == 404


def test_only_http_log_urls_become_links():
    op = {"name": f"{DATASET}/operations/1", "done": True, "metadata": {"logsUrl": "javascript:alert(1)"}}
    assert operation_view(op)["logsUrl"] is None
    op["metadata"]["logsUrl"] = "http://127.0.0.1:1/logs/x"
    assert operation_view(op)["logsUrl"] == "http://127.0.0.1:1/logs/x"


def test_progress_counts_success_and_failure_against_the_instances_selected():
    v = operation_view({"name": "x", "metadata": {"counter": {"success": "3", "failure": "1", "pending": "4"}}})
    assert (v["done"], v["selected"], v["percent"]) == (False, 8, 50)


@pytest.mark.parametrize("name", ["dicom", "DICOM_2026", "table with spaces", "tâble-ü_表_١٢", "a" * 1024, "x-y"])
def test_bigquery_table_names_that_are_allowed(name):
    assert names.table_name_problem(name) is None


@pytest.mark.parametrize("name, says", [
    ("", "Enter a table name"), ("a$b", "'$' is not allowed"), ("a.b", "'.' is not allowed"),
    ("a/b", "'/' is not allowed"), ("<b>", "'<' is not allowed"), (" lead", "start or end with a space"),
    ("ü" * 513, "1,024 UTF-8 bytes"), ("tab\tname", "'U+0009' is not allowed")])
def test_bigquery_table_names_that_are_refused(name, says):
    assert says in names.table_name_problem(name)


def test_the_server_refuses_a_bad_table_name_before_calling_the_api(client):
    before = len(operations(client))
    r = client.post("/console/export", data=export_form(token(client), table="bad$name"))
    assert r.status_code == 400 and "&#39;$&#39; is not allowed" in r.get_data(as_text=True)
    r = client.post("/console/export", data={**export_form(token(client)), "filter_uri": "http://x/y"})
    assert r.status_code == 400 and "gs://BUCKET/OBJECT" in r.get_data(as_text=True)
    r = client.post("/console/export", data=export_form(token(client), disposition="WRITE_SOMETIMES"))
    assert r.status_code == 400 and "Choose a write disposition" in r.get_data(as_text=True)
    assert len(operations(client)) == before
