"""python -m stack demo | up | down | submit | watch | status — the local stack and a small client.

  demo                  the whole job offline, then everything stopped (make demo)
  up / down             keep the stack running in the background (make up / make down); state in .local/stack.json
  submit --store S --table bq://P.D.T [--write-disposition W | --force] [--filter gs://B/O] [--request-id ID]
  watch [--request-id ID] [--until-terminal]   print events as they arrive
  status REQUEST_ID     the ledger record, from the export_status function
  preflight [--project P]  read-only checks of a deployment (local stack or Google Cloud), one line each
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / ".local"
STATE = LOCAL / "stack.json"
TERMINAL = {"EXPORT_SUCCEEDED", "EXPORT_FAILED", "EXPORT_CANCELLED", "EXPORT_TIMED_OUT", "EXPORT_REJECTED"}


def _sigterm_as_interrupt():
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def cmd_demo(_args) -> int:
    from stack import demo
    _sigterm_as_interrupt()
    LOCAL.mkdir(exist_ok=True)
    return demo.run(Path(tempfile.mkdtemp(prefix="demo-", dir=LOCAL)))


def cmd_run(args) -> int:
    """The supervisor `up` starts in the background: the stack, until SIGTERM."""
    from stack import local
    _sigterm_as_interrupt()
    routes = json.loads(args.ingest_routes) if args.ingest_routes else {}
    st = local.Stack(LOCAL / "stack", ingest_routes=routes)
    try:
        st.start()
        STATE.write_text(json.dumps({**st.describe(), "supervisor": os.getpid()}, indent=2))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        st.stop()
        STATE.unlink(missing_ok=True)
    return 0


def cmd_up(args) -> int:
    if STATE.exists():
        print(f"already up (see {STATE}); `make down` first")
        return 1
    LOCAL.mkdir(exist_ok=True)
    log = open(LOCAL / "stack.log", "ab")
    argv = [sys.executable, "-m", "stack", "run"] + (["--ingest-routes", args.ingest_routes] if args.ingest_routes
                                                     else [])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not STATE.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"the stack did not come up; see {LOCAL / 'stack.log'}")
            _kill_group(proc.pid)
            return 1
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    st = json.loads(STATE.read_text())
    print("local stack is up:")
    for k in ("healthcare", "gcs", "pubsub", "firestore", "functions", "topics", "data_dir"):
        print(f"  {k}: {st[k]}")
    print("\nexport these to use it:")
    for k, v in st["env"].items():
        print(f"  export {k}={v}")
    print("\nthen: python -m stack submit --store ... --table bq://...   |   python -m stack watch   |   make down")
    return 0


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def cmd_down(_args) -> int:
    if not STATE.exists():
        print("not up")
        return 0
    st = json.loads(STATE.read_text())
    _kill_group(st["supervisor"])
    deadline = time.monotonic() + 30
    while STATE.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the supervisor removes the file once everything it started has stopped
    for pgid in st.get("pgids", []):  # belt and braces: a supervisor killed hard leaves its children
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
    STATE.unlink(missing_ok=True)
    print("local stack stopped")
    return 0


def _stack() -> dict:
    if not STATE.exists():
        raise SystemExit("the local stack is not up: run `make up` first")
    st = json.loads(STATE.read_text())
    os.environ.update(st["env"])
    return st


def cmd_submit(args) -> int:
    from google.cloud import pubsub_v1
    st = _stack()
    dest = {"tableUri": args.table}
    if args.write_disposition:
        dest["writeDisposition"] = args.write_disposition
    if args.force:
        dest["force"] = True
    body = {"requestId": args.request_id or f"cli-{uuid.uuid4().hex[:12]}", "dicomStore": args.store,
            "bigqueryDestination": dest}
    if args.filter:
        body["filterConfig"] = {"resourcePathsGcsUri": args.filter}
    pub = pubsub_v1.PublisherClient()
    mid = pub.publish(f"projects/{st['project']}/topics/{st['topics']['requests']}",
                      json.dumps(body).encode()).result(timeout=30)
    print(json.dumps({"requestId": body["requestId"], "messageId": mid}))
    return 0


def cmd_watch(args) -> int:
    from google.api_core import exceptions
    from google.cloud import pubsub_v1
    st = _stack()
    sub = pubsub_v1.SubscriberClient()
    path = f"projects/{st['project']}/subscriptions/{st['events_subscription']}"
    try:
        while True:
            try:
                resp = sub.pull(subscription=path, max_messages=20, timeout=5)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                continue
            if not resp.received_messages:
                continue
            sub.acknowledge(subscription=path, ack_ids=[m.ack_id for m in resp.received_messages])
            for m in resp.received_messages:
                event = json.loads(m.message.data)
                if args.request_id and event.get("requestId") != args.request_id:
                    continue
                print(json.dumps(event), flush=True)
                if args.until_terminal and event.get("eventType") in TERMINAL:
                    return 0 if event["eventType"] == "EXPORT_SUCCEEDED" else 1
    except KeyboardInterrupt:
        return 0


def cmd_status(args) -> int:
    import requests
    st = _stack()
    r = requests.get(st["functions"]["export_status"], params={"requestId": args.request_id}, timeout=30)
    print(r.text.strip())
    return 0 if r.ok else 1


def cmd_preflight(args) -> int:
    from stack import preflight
    if not args.project and STATE.exists() and not os.environ.get("HEALTHCARE_API_ENDPOINT"):
        _stack()  # `make up` is running: check it, with the environment submit and watch use
    return preflight.main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo")
    for name in ("up", "run"):
        sp = sub.add_parser(name)
        sp.add_argument("--ingest-routes", help="INGEST_ROUTES JSON: also run ingest_notification")
    sub.add_parser("down")
    s = sub.add_parser("submit")
    s.add_argument("--store", required=True)
    s.add_argument("--table", required=True)
    s.add_argument("--write-disposition")
    s.add_argument("--force", action="store_true")
    s.add_argument("--filter")
    s.add_argument("--request-id")
    w = sub.add_parser("watch")
    w.add_argument("--request-id")
    w.add_argument("--until-terminal", action="store_true")
    st = sub.add_parser("status")
    st.add_argument("request_id")
    from stack import preflight
    preflight.add_arguments(sub.add_parser("preflight", help="read-only checks; exit 1 when one fails"))
    args = p.parse_args(argv)
    return {"preflight": cmd_preflight, "demo": cmd_demo, "up": cmd_up, "run": cmd_run, "down": cmd_down, "submit": cmd_submit,
            "watch": cmd_watch, "status": cmd_status}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
