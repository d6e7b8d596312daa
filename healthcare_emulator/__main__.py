"""python -m healthcare_emulator serve | bq mk | query — see README.md beside this file."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def _rates(items: list[str]) -> dict:
    out = {}
    for item in items:
        method, _, rate = item.partition("=")
        try:
            value = float(rate)
        except ValueError:
            raise SystemExit(f"--fault {item!r}: expected METHOD=RATE, e.g. export=0.3") from None
        if not 0 <= value <= 1:
            raise SystemExit(f"--fault {item!r}: RATE must be between 0 and 1")
        out[method] = value
    return out


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m healthcare_emulator",
                                description="Local emulator of the Cloud Healthcare API (DICOM, export to BigQuery).")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve the REST API")
    s.add_argument("--host", default=env("HC_EMULATOR_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(env("HC_EMULATOR_PORT", "8080")))
    s.add_argument("--data-dir", required=True)
    s.add_argument("--require-token", default=env("HC_EMULATOR_REQUIRE_TOKEN"),
                   help="only accept 'Authorization: Bearer TOKEN' (default: any token, or none)")
    s.add_argument("--fault", action="append", default=(env("HC_EMULATOR_FAULTS") or "").split(",") if
                   env("HC_EMULATOR_FAULTS") else [], metavar="METHOD=RATE",
                   help="answer METHOD (export, operations.get, operations.list, operations.cancel) with 429/503 "
                        "at RATE (0..1), or export.started with 500 after starting the export; repeatable")
    s.add_argument("--latency", type=float, default=float(env("HC_EMULATOR_LATENCY_S", "0")),
                   help="seconds added to every export/operations call")
    s.add_argument("--max-running-operations", type=int, default=int(env("HC_EMULATOR_MAX_RUNNING_OPERATIONS", "0")),
                   help="per project; beyond it export answers 429 RESOURCE_EXHAUSTED (0: no limit)")
    s.add_argument("--export-rate", type=float, default=float(env("HC_EMULATOR_EXPORT_RATE", "0")),
                   help="slow-export mode: instances per second (0: full speed)")
    s.add_argument("--export-workers", type=int,
                   default=int(env("HC_EMULATOR_EXPORT_WORKERS")) if env("HC_EMULATOR_EXPORT_WORKERS") else None,
                   help="processes that read and map instances during an export (default: one per core; "
                        "0 or 1: in the export thread)")
    s.add_argument("--enforce-iam", action="store_true",
                   default=env("HC_EMULATOR_ENFORCE_IAM", "").strip().lower() in ("1", "true", "yes"),
                   help="an export fails with PERMISSION_DENIED unless the store project's Cloud Healthcare "
                        "Service Agent may write the destination dataset and run jobs in its project")
    s.add_argument("--verbose", action="store_true")

    b = sub.add_parser("bq", help="BigQuery helpers on the local warehouse")
    bsub = b.add_subparsers(dest="bqcmd", required=True)
    mk = bsub.add_parser("mk", help="create a BigQuery dataset: PROJECT.DATASET")
    mk.add_argument("ref")
    mk.add_argument("-f", "--force", action="store_true", help="succeed if the dataset already exists (as bq mk -f)")
    mk.add_argument("--data-dir", required=True)

    q = sub.add_parser("query", help="run BigQuery Standard SQL; prints a JSON array of rows")
    q.add_argument("--data-dir", required=True)
    q.add_argument("sql")

    args = p.parse_args(argv)
    if args.cmd == "bq":
        from .warehouse import cli_bq_mk
        return cli_bq_mk(args.data_dir, args.ref, exists_ok=args.force)
    if args.cmd == "query":
        from .warehouse import cli_query
        return cli_query(args.data_dir, args.sql)
    return serve(args)


def serve(args) -> int:
    from werkzeug.serving import WSGIRequestHandler, make_server

    from .server import Options, create_app

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = Options(require_token=args.require_token, fault_rates=_rates([f for f in args.fault if f]),
                      latency_s=args.latency, max_running_operations=args.max_running_operations,
                      export_instances_per_s=args.export_rate, export_workers=args.export_workers,
                      verbose=args.verbose, enforce_iam=args.enforce_iam)
    app = create_app(args.data_dir, options)

    class Handler(WSGIRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_request(self, *a, **k):
            if args.verbose:
                super().log_request(*a, **k)

    server = make_server(args.host, args.port, app, threaded=True, request_handler=Handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"Cloud Healthcare API emulator on http://{args.host}:{server.port}/ (data dir {args.data_dir})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
