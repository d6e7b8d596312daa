"""Every command deploy.sh --dry-run prints is accepted by the installed Cloud SDK's own argument parsers.

Each printed line is read back into words by bash (as a user pasting it would) and run with the real `gcloud`
or `bq`, its API endpoints pointed at a closed local port, in a throwaway configuration with a fake account,
project and access token. Arguments that parse lead to an API call, which fails with "connection refused":
that is the only outcome accepted. Any other (a parse error, an unknown flag, an empty resource name, an
unreadable --env-vars-file, a call to a real Google endpoint) fails the test.

Cost: each gcloud run is about 1.5 s of CPU before its first connection, and gcloud would then retry for about
30 s, so a command is stopped at its first refused connection (gcloud logs it at --verbosity=debug; bq reports
once, at its end). The flag combinations print about 135 commands; many differ only in a name (five topics, five
functions' dead-letter policies): commands with the same tool, command path, flags and value shapes (every run
of [a-z0-9-] in a value is one letter, so an empty value, a path, a domain-scoped project or a regular expression
is a shape of its own) are run once. That is about 60 commands, in a pool of WORKERS: 40-90 s on two shared cores.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deploy.plan import Step, dry_run

# every API deploy.sh's commands call (gcloud's api_endpoint_overrides; bq reads the bigquery one)
APIS = ("serviceusage", "cloudresourcemanager", "pubsub", "firestore", "iam", "healthcare", "storage",
        "cloudfunctions", "eventarc", "cloudscheduler", "bigquery", "run", "cloudbuild", "artifactregistry",
        "logging", "cloudbilling", "appengine", "datastore")

# Flag combinations that together reach every branch of deploy.sh: no allowlist (the warning), one source
# project (project-level custom-role binding), the defaults; and everything: Healthcare datasets in two
# projects, concrete, wildcard and domain-scoped allowed datasets, ingest with routes (string and object),
# a filter bucket, extra destination projects, a ledger collection with regex characters, other names.
COMBINATIONS = {
    "minimal": ["--project", "my-proj-1"],
    "everything": [
        "--project", "my-proj-1", "--region", "europe-west4", "--ledger-collection", "exports.v2",
        "--requests-topic", "req-t", "--events-topic", "ev-t", "--poll-topic", "poll-t",
        "--reconcile-topic", "rec-t", "--dead-letter-topic", "dlq-t", "--service-account", "dicom-x",
        "--allowed-stores", "projects/my-proj-1/locations/*/datasets/*/dicomStores/*",
        "--allowed-datasets", "my-proj-1.imaging,analytics-proj.dicom_*,example.com:legacy-proj.exports,*",
        "--dest-projects", "billing-proj", "--default-store",
        "projects/my-proj-1/locations/europe-west4/datasets/hc/dicomStores/main",
        "--healthcare-datasets", "projects/hc-proj-2/locations/us/datasets/a,projects/my-proj-1/locations/europe-west4/datasets/hc",
        "--filter-bucket", "my-filters", "--ingest-topic", "dicom-stored",
        "--ingest-routes", '{"projects/my-proj-1/locations/europe-west4/datasets/hc/dicomStores/main": '
                           '"bq://my-proj-1.imaging.instances", "projects/hc-proj-2/locations/us/datasets/a/'
                           'dicomStores/s": {"tableUri": "bq://example.com:legacy-proj.exports.t", "schemaJson": {}}}',
        "--schedule", "*/2 * * * *", "--reconcile-schedule", "0 * * * *", "--max-operation-age", "3600",
    ],
}

WORKERS = 8  # each command is CPU-bound until its first connection attempt (about 1.3 s of CPU)
CONNECTION_REFUSED = ("Connection refused", "ConnectionRefusedError")


VERBS = {"describe", "create", "update", "list", "deploy", "enable", "add-iam-policy-binding", "undelete"}


def shape(argv: tuple[str, ...]) -> tuple[str, ...]:
    """argv with every value reduced to its shape (see the module's docstring); command words are kept."""
    out, after_verb = [], False
    for a in argv:
        if a.startswith("--") and "=" in a:
            flag, value = a.split("=", 1)
            out.append(flag + "=" + re.sub(r"[a-z0-9-]+", "x", value))
        elif after_verb:
            out.append(re.sub(r"[a-z0-9-]+", "x", a))
        else:
            out.append(a)
        after_verb = after_verb or a in VERBS
    return tuple(out)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdk_env(config_dir: Path, port: int) -> dict:
    token = config_dir / "token"
    token.write_text("ya29.fake-token-for-parse-checks\n")
    env = {
        "PATH": os.environ["PATH"], "HOME": str(config_dir), "LANG": "C.UTF-8",
        "CLOUDSDK_CONFIG": str(config_dir / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "CLOUDSDK_CORE_ACCOUNT": "deployer@example.com", "CLOUDSDK_CORE_PROJECT": "fake-proj-0",
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token), "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
    }
    for api in APIS:
        env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api.upper()}"] = f"http://127.0.0.1:{port}/"
    return env


def materialise(step: Step, files: dict[str, Path]) -> list[str]:
    """The printed command names files deploy.sh deleted on exit: point them at copies of their printed text."""
    out = []
    for a in step.argv:
        for flag, key in (("--env-vars-file=", "env"), ("--lifecycle-file=", "lifecycle")):
            if a.startswith(flag):
                a = flag + str(files[key])
        out.append(a)
    return out


def closing_commands(stdout: str) -> list[tuple[str, ...]]:
    """The command deploy.sh's closing message tells the user to run (inside $(...)), read back by bash."""
    from tests.deploy.plan import unquote
    start = stdout.index("$(gcloud --project=")
    inner = stdout[start + 2:stdout.index(")?requestId", start)]
    return unquote([inner])


def test_every_dry_run_command_parses_with_the_installed_sdk():
    if not (shutil.which("gcloud") and shutil.which("bq")):
        pytest.fail("gcloud and bq (Cloud SDK) must be installed: this test runs their argument parsers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs: dict[tuple[str, ...], str] = {}
        for name, args in COMBINATIONS.items():
            plan = dry_run(*args)
            files = {}
            for key, text in plan.files.items():
                files[key] = tmp / f"{name}-{key}"
                files[key].write_text(text)
            for step in plan.steps:
                jobs.setdefault(tuple(materialise(step, files)), name)
            for argv in closing_commands(plan.stdout):
                jobs.setdefault(argv, name)
        shapes: dict[tuple[str, ...], tuple[str, ...]] = {}
        for argv in jobs:
            shapes.setdefault(shape(argv), argv)
        representatives = {argv: jobs[argv] for argv in shapes.values()}
        # every branch is there: lookups, commands run always and per lookup, bq, the fifth function
        plans = [dry_run(*a) for a in COMBINATIONS.values()]
        assert {s.cond for p in plans for s in p.steps} == {None, "absent", "present", "deleted"}
        assert {s.kind for p in plans for s in p.steps} == {"+", "?"}
        assert any(a[0] == "bq" for a in jobs) and any("reconcile_tables" in a for a in jobs)
        assert any(a[:4] == ("gcloud", "--project=my-proj-1", "functions", "describe") for a in jobs)

        env = sdk_env(tmp, closed_port())

        def attempt(argv: tuple[str, ...]) -> tuple[tuple[str, ...], bool, str, float]:
            """Run one command until it reports its first refused connection (it parsed, it called the API),
            or exits. gcloud logs each failed attempt at --verbosity=debug; bq reports once, at its end."""
            t0 = time.monotonic()
            cmd = list(argv)
            if cmd[0] == "gcloud":
                cmd.insert(1, "--verbosity=debug")
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, env=env, cwd=tmp, start_new_session=True)

            def kill() -> None:  # gcloud and bq are wrapper scripts: end the whole process group
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            watchdog = threading.Timer(180, kill)  # a hung command fails the test instead of hanging it
            watchdog.start()
            seen, refused = [], False
            try:
                assert p.stdout is not None
                for line in p.stdout:
                    seen.append(line)
                    if any(m in line for m in CONNECTION_REFUSED):
                        refused = True
                        break
            finally:
                watchdog.cancel()
                kill()
                p.wait()
            return argv, refused, "".join(seen[-8:]), time.monotonic() - t0

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            results = list(pool.map(attempt, representatives))
    failures = [f"[{jobs[argv]}] {' '.join(argv)}\n  {out.strip()[-800:]}" for argv, ok, out, _ in results if not ok]
    assert not failures, f"{len(failures)} of {len(results)} commands did not parse:\n" + "\n".join(failures)
    print(f"{len(results)} command shapes of {len(jobs)} commands parsed; slowest {max(r[3] for r in results):.0f} s")


def test_a_parse_error_is_caught():
    """The harness itself: a flag gcloud doesn't know fails before any connection, so it would be reported."""
    with tempfile.TemporaryDirectory() as tmp:
        env = sdk_env(Path(tmp), closed_port())
        r = subprocess.run(["gcloud", "--project=my-proj-1", "pubsub", "topics", "describe", "t", "--format=value(name)",
                            "--filter=queryScope:COLLECTION", "AND", "x"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode != 0 and not any(m in r.stderr for m in CONNECTION_REFUSED), r.stderr
        r = subprocess.run(["bq", "--headless", "add-iam-policy-binding", "--dataset", "--no-such-flag", "p:d"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode != 0 and not any(m in r.stdout + r.stderr for m in CONNECTION_REFUSED), r.stderr
