"""Item 6: real exports of DICOM files carrying distinctive patient values, with an emulator that only accepts
one bearer token (the functions get it through Application Default Credentials, an ADC file holding an access
token): neither the patient values nor the token appear in any function log line or published event."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.reliability.pipeline import Pipeline
from tests.support import dicom_files, procs
from tests.support.hcapi import unique
from tests.support.reliability import SIZES, report

TOKEN = "ya29.a0-reliability-token-" + "q" * 28
PHI = {"PatientName": "Zyxwvut^Qwerty", "PatientID": "PID-93817", "PatientBirthDate": "19710203"}
NEEDLES = ["Zyxwvut", "Qwerty", "PID-93817", "19710203", "1971-02-03", TOKEN, TOKEN[:20]]


def test_no_patient_value_or_token_in_logs_or_events(pubsub_clients, pubsub, firestore, logs_dir, tmp_path):
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "local", "client_secret": "local",
                               "refresh_token": "local", "token": TOKEN, "expiry": "2099-01-01T00:00:00Z"}))
    p = Pipeline(pubsub_clients, pubsub, firestore, logs_dir, tmp_path, "--require-token", TOKEN, token=TOKEN,
                 env={"GOOGLE_APPLICATION_CREDENTIALS": str(adc)})
    try:
        n = SIZES["phi_requests"]
        files = [dicom_files.with_uids(src, tmp_path / f"{unique('phi')}.dcm", **PHI)
                 for src in dicom_files.storable()[:n]]
        stores, rids = [], []
        for f in files:
            store = p.store(files=[f])
            stores.append(store)
            body = p.request(store)
            rids.append(body["requestId"])
            p.fn.publish(body)
        p.drive(rids, timeout=120)
        p.pull(2.0)
        succeeded = sum(1 for r in rids if p.terminal(r) and p.terminal(r)[0]["attributes"]["eventType"] == "EXPORT_SUCCEEDED")
        tables = [r[0]["data"]["bigqueryDestination"]["tableUri"][5:] for r in (p.terminal(x) for x in rids) if r]
        # the values did reach BigQuery (so their absence below means something)
        q = subprocess.run([sys.executable, "-m", "healthcare_emulator", "query", "--data-dir", str(p.data_dir),
                            f"SELECT COUNT(*) AS n FROM `{tables[0]}` WHERE PatientID = 'PID-93817'"],
                           capture_output=True, text=True, cwd=procs.ROOT, timeout=60)
        in_bq = q.returncode == 0 and "1" in q.stdout
        texts = {"intake log": p.fn.log_text(), "poller log": Path(p.poller.svc.log_path).read_text(errors="replace")}
        events = [e for evs in p.events.values() for e in evs]
        texts["events"] = "\n".join(json.dumps(e, ensure_ascii=False) for e in events)
        found = {where: [x for x in NEEDLES if x in text] for where, text in texts.items()}
        leaks = sum(len(v) for v in found.values())
        report("phi_and_token_scan", exports=len(rids), succeeded=succeeded, values_in_bigquery=in_bq,
               log_lines=sum(t.count("\n") for t in texts.values()), events=len(events), leaks=leaks,
               found={k: v for k, v in found.items() if v})
        assert succeeded == n and in_bq, q.stdout + q.stderr
        assert leaks == 0, found
    finally:
        p.stop()
