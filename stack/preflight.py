"""python -m stack preflight: is this deployment able to export? Read-only checks, one line each.

    ✓ what was checked
    ✗ what was checked: why not; fix: the exact gcloud or bq command

Exit 1 when any check fails, 0 otherwise. It never changes anything. Every call has a time limit
(--timeout, default 10 s), and a call that fails or times out is a ✗ with its reason.

Where it looks: the same environment variables as the functions (config/: GOOGLE_CLOUD_PROJECT, topics,
ALLOWED_BQ_DATASETS, INGEST_ROUTES, HEALTHCARE_API_ENDPOINT, the emulator hosts, BIGQUERY_API_ENDPOINT,
RESOURCE_MANAGER_API_ENDPOINT), plus deploy.sh's names for what only the deployment knows (POLL_TOPIC,
DEAD_LETTER_TOPIC, INGEST_TOPIC, REGION, SERVICE_ACCOUNT), each also a flag. With HEALTHCARE_API_ENDPOINT on
a loopback address it checks the local stack (emulators, no token); otherwise Google Cloud with Application
Default Credentials, where it also checks the runtime account's roles, the Cloud Scheduler job and the
functions' retry setting. The IAM rules are the emulator's (healthcare_emulator/iam.py): only direct grants on
the project or dataset are seen (not groups, folders, organisations or custom roles).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase

from healthcare_emulator import iam

SCHEDULER_JOB = "dicom-export-poll"
RUNTIME_ROLES = ("roles/datastore.user", "roles/logging.logWriter")
PUBLISHER_ROLES = frozenset({"roles/pubsub.publisher", "roles/pubsub.editor", "roles/pubsub.admin", "roles/editor",
                             "roles/owner"})
TRIGGERS = {"requests": "export_request", "poll": "poll_exports", "ingest": "ingest_notification"}


@dataclass(frozen=True)
class Result:
    what: str
    ok: bool
    reason: str = ""
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"✓ {self.what}"
        return f"✗ {self.what}: {self.reason}; fix: {self.fix}"


class CallFailed(Exception):
    """A call that got no usable answer (connection error, timeout, 401/403, 5xx): the reason."""


def cmd(*argv: str) -> str:
    return " ".join(shlex.quote(a) if not a.startswith("$(") else a for a in argv)


# -- HTTP: the project's one transport, with a time limit on every call ---------------------------------
class Http:
    def __init__(self, tokens, timeout_s: float):
        self.tokens, self.timeout_s = tokens, timeout_s

    def get(self, url: str, what: str) -> dict | None:
        """The JSON body, or None for 404; CallFailed for anything else."""
        return self._send("GET", url, what)

    def post(self, url: str, what: str, body: dict) -> dict | None:  # getIamPolicy is a POST that only reads
        return self._send("POST", url, what, json=body)

    def _send(self, method: str, url: str, what: str, **kw) -> dict | None:
        """One attempt through the functions' transport (handlers/adapters/transport.py), within the time limit."""
        import time

        from handlers.adapters import transport
        try:
            r = transport.call(method, url, tokens=self.tokens, deadline=time.monotonic() + self.timeout_s,
                               what=f"cannot read {what}", timeout_s=self.timeout_s, max_attempts=1, **kw)
        except transport.HttpError as e:
            if e.http_status == 404:
                return None
            raise CallFailed(f"cannot read {what}: {e.http_status} {e.status}: {e.message}") from None
        except transport.Unavailable as e:
            raise CallFailed(f"{e} (time limit {self.timeout_s:g} s)") from None
        try:
            body = r.json()
        except ValueError:
            raise CallFailed(f"cannot read {what}: the answer is not JSON") from None
        return body if isinstance(body, dict) else {}


# -- what to check: the functions' settings plus the deployment's names ----------------------------------
@dataclass
class Target:
    project: str
    local: bool
    region: str
    service_account: str
    healthcare: str
    healthcare_version: str
    bigquery: str
    resource_manager: str
    pubsub: str
    firestore: str
    firestore_database: str
    topics: dict  # role -> topic id: requests, events, poll, deadLetter, ingest (when set)
    dataset_patterns: tuple[str, ...]  # ALLOWED_BQ_DATASETS and the routes' PROJECT.DATASET
    routes: dict  # routed store -> bq:// table
    store_projects: tuple[str, ...]  # whose Cloud Healthcare Service Agent exports
    healthcare_datasets: tuple[str, ...] = ()  # deploy.sh's HEALTHCARE_DATASETS


def target(settings, args) -> Target:
    project = args.project or settings.project
    if not project:
        raise SystemExit("preflight: no project: pass --project or set GOOGLE_CLOUD_PROJECT")
    local = settings.healthcare_is_local
    routes = dict(settings.ingest_routes)
    routed = tuple(dict.fromkeys(uri[5:].rsplit(".", 1)[0] for uri in routes.values()))
    hc_sets = tuple(d.strip() for d in (args.healthcare_datasets or "").split(",") if d.strip())
    stores = [*routes, *([settings.default_dicom_store] if settings.default_dicom_store else []),
              *settings.allowed_dicom_stores, *hc_sets]
    store_projects = tuple(dict.fromkeys(p for s in stores if (p := _literal_project(s)))) or (project,)
    topics = {"requests": settings.requests_topic, "events": settings.events_topic, "poll": args.poll_topic,
              "deadLetter": args.dead_letter_topic}
    if args.ingest_topic:
        topics["ingest"] = args.ingest_topic
    return Target(
        project=project, local=local, region=args.region, service_account=f"{args.service_account}@{project}"
        ".iam.gserviceaccount.com", healthcare=settings.healthcare_endpoint,
        healthcare_version=settings.healthcare_version,
        bigquery=settings.bigquery_endpoint, resource_manager=settings.resource_manager_endpoint,
        pubsub=f"http://{settings.pubsub_emulator_host}" if settings.pubsub_emulator_host
        else "https://pubsub.googleapis.com",
        firestore=f"http://{settings.firestore_emulator_host}" if settings.firestore_emulator_host
        else "https://firestore.googleapis.com",
        firestore_database=settings.firestore_database, topics=topics,
        dataset_patterns=tuple(dict.fromkeys((*settings.allowed_bq_datasets, *routed))), routes=routes,
        store_projects=store_projects,
        healthcare_datasets=hc_sets)


def _literal_project(store_pattern: str) -> str | None:
    parts = store_pattern.split("/")
    if len(parts) > 1 and parts[0] == "projects" and not any(c in parts[1] for c in "*?["):
        return parts[1]
    return None


# -- the checks ---------------------------------------------------------------------------------------------
class Preflight:
    def __init__(self, t: Target, http: Http):
        self.t, self.http = t, http
        self.results: list[Result] = []
        self.notes: list[str] = []
        self._policies: dict[str, dict | CallFailed] = {}

    def add(self, what: str, ok: bool, reason: str = "", fix: str = "") -> bool:
        self.results.append(Result(what, ok, reason, fix))
        return ok

    def run(self) -> list[Result]:
        for step in (self.check_destinations, self.check_stores, self.check_topics, self.check_firestore):
            step()
        if not self.t.local:
            for step in (self.check_runtime_account, self.check_scheduler, self.check_functions):
                step()
        return self.results

    def read(self, url: str, what: str, fix: str) -> tuple[bool, dict | None]:
        """(True, body or None for 404), or (False, None) after recording the failure as a ✗."""
        try:
            return True, self.http.get(url, "it")
        except CallFailed as e:
            self.add(what, False, str(e), fix)
            return False, None

    def policy(self, project: str) -> dict | CallFailed:
        if project not in self._policies:
            url = f"{self.t.resource_manager}/v1/projects/{project}:getIamPolicy"
            try:
                self._policies[project] = self.http.post(url, f"the IAM policy of project {project}",
                                                         {"options": {"requestedPolicyVersion": 3}}) or {}
            except CallFailed as e:
                self._policies[project] = e
        return self._policies[project]

    def agents(self) -> list[str]:
        """The Cloud Healthcare Service Agents of the store projects (a ✗ for a number it cannot read)."""
        out = []
        for p in self.t.store_projects:
            ok, body = self.read(f"{self.t.resource_manager}/v1/projects/{p}", f"project {p} (its number)",
                                 cmd("gcloud", "projects", "describe", p))
            if ok and body and body.get("projectNumber"):
                out.append(iam.service_agent(str(body["projectNumber"])))
            elif ok:
                self.add(f"project {p} (its number)", False, "Resource Manager does not know the project",
                         cmd("gcloud", "projects", "describe", p))
        return out

    # BigQuery: every allowed and routed destination dataset exists; every agent may write it and run jobs there.
    def check_destinations(self) -> None:
        if not self.t.dataset_patterns:
            return
        agents = self.agents()
        jobs_checked: set[str] = set()
        for project, dataset in self.datasets():
            meta = self.check_dataset_exists(project, dataset)
            for agent in agents:
                if meta is not None:
                    self.check_dataset_write(agent, project, dataset, meta)
                if project not in jobs_checked:
                    self.check_jobs(agent, project)
            jobs_checked.add(project)

    def datasets(self) -> list[tuple[str, str]]:
        """The literal (project, dataset) pairs, patterns expanded by listing their project's datasets."""
        out: list[tuple[str, str]] = []
        for pattern in self.t.dataset_patterns:
            project, _, dataset = pattern.rpartition(".")
            if any(c in project for c in "*?[") or not project:
                self.notes.append(f"pattern {pattern}: the project is a wildcard; its datasets are not checked")
            elif not any(c in dataset for c in "*?["):
                out.append((project, dataset))
            else:
                found = self.list_datasets(project, pattern)
                if found is not None and not found:
                    self.notes.append(f"pattern {pattern}: no dataset matches it yet")
                out += [(project, d) for d in found or [] if fnmatchcase(f"{project}.{d}", pattern)]
        return list(dict.fromkeys(out))

    def list_datasets(self, project: str, pattern: str) -> list[str] | None:
        ids, token = [], ""
        for _ in range(100):  # at most 100 pages
            url = f"{self.t.bigquery}/bigquery/v2/projects/{project}/datasets?maxResults=1000" + (
                f"&pageToken={token}" if token else "")
            ok, body = self.read(url, f"the BigQuery datasets of project {project} (for {pattern})",
                                 cmd("bq", "ls", f"--project_id={project}"))
            if not ok:
                return None
            ids += [d["datasetReference"]["datasetId"] for d in (body or {}).get("datasets", [])]
            token = (body or {}).get("nextPageToken", "")
            if not token:
                break
        return ids

    def check_dataset_exists(self, project: str, dataset: str) -> dict | None:
        what = f"BigQuery dataset {project}:{dataset} exists"
        fix = cmd("bq", f"--project_id={project}", "mk", "--dataset", f"{project}:{dataset}")
        ok, meta = self.read(f"{self.t.bigquery}/bigquery/v2/projects/{project}/datasets/{dataset}", what, fix)
        if ok:
            self.add(what, meta is not None, "not found", fix)
        return meta

    def check_dataset_write(self, agent: str, project: str, dataset: str, meta: dict) -> None:
        what = f"{agent} can write BigQuery dataset {project}:{dataset}"
        fix = cmd("bq", f"--project_id={project}", "add-iam-policy-binding", "--dataset", f"--member=serviceAccount:{agent}",
                  "--role=roles/bigquery.dataEditor", f"{project}:{dataset}")
        policy = self.policy(project)
        if isinstance(policy, CallFailed):
            self.add(what, False, str(policy), fix)
            return
        self.add(what, iam.can_write_dataset(agent, meta.get("access"), policy),
                 f"no WRITER access entry on the dataset and no roles/bigquery.dataEditor (or above) on project "
                 f"{project} (missing {iam.TABLES_CREATE})", fix)

    def check_jobs(self, agent: str, project: str) -> None:
        what = f"{agent} can run BigQuery jobs in project {project}"
        fix = cmd("gcloud", "projects", "add-iam-policy-binding", project, f"--member=serviceAccount:{agent}",
                  "--role=roles/bigquery.jobUser", "--condition=None")
        policy = self.policy(project)
        if isinstance(policy, CallFailed):
            self.add(what, False, str(policy), fix)
            return
        self.add(what, iam.can_run_jobs(agent, policy),
                 f"no roles/bigquery.jobUser (or above) on project {project} (missing {iam.JOBS_CREATE})", fix)

    # Healthcare: every routed store exists and notifies the ingest topic.
    def check_stores(self) -> None:
        topic = self.t.topics.get("ingest")
        if self.t.routes and not topic:
            self.add("the ingest topic is known", False, "INGEST_ROUTES names stores but neither --ingest-topic nor "
                     "INGEST_TOPIC is set", cmd("python", "-m", "stack", "preflight", "--ingest-topic=TOPIC"))
        for store in self.t.routes:
            _, sp, _, loc, _, ds, _, sid = store.split("/")
            where = [f"--dataset={ds}", f"--location={loc}", f"--project={sp}"]
            full = f"projects/{self.t.project}/topics/{topic}"
            what = f"DICOM store {store} exists"
            create = cmd("gcloud", "healthcare", "dicom-stores", "create", sid, *where,
                         *([f"--pubsub-topic={full}"] if topic else []))
            ok, body = self.read(f"{self.t.healthcare}/{self.t.healthcare_version}/{store}", what, create)
            if not ok or not self.add(what, body is not None, "not found", create) or not topic:
                continue
            assert body is not None
            configs = [body.get("notificationConfig") or {}, *(body.get("notificationConfigs") or [])]
            self.add(f"DICOM store {store} notifies {full}", any(c.get("pubsubTopic") == full for c in configs),
                     "its notification config names " + (", ".join(c["pubsubTopic"] for c in configs
                                                                   if c.get("pubsubTopic")) or "no topic"),
                     cmd("gcloud", "healthcare", "dicom-stores", "update", sid, *where, f"--pubsub-topic={full}"))

    # Pub/Sub: the topics; the functions' trigger subscriptions with a dead-letter policy; a dead-letter holder.
    def check_topics(self) -> None:
        p, dlq = self.t.project, self.t.topics["deadLetter"]
        for role, topic in self.t.topics.items():
            what = f"Pub/Sub topic {topic} ({role}) exists"
            fix = cmd("gcloud", "pubsub", "topics", "create", topic, f"--project={p}")
            ok, body = self.read(f"{self.t.pubsub}/v1/projects/{p}/topics/{topic}", what, fix)
            if not ok or not self.add(what, body is not None, "not found", fix):
                continue
            subs = self.subscriptions(topic)
            if subs is None:
                continue
            if role in TRIGGERS:
                self.check_trigger(role, topic, subs, dlq)
            elif role == "deadLetter":
                self.add(f"topic {dlq} has a subscription that keeps dead letters", bool(subs), "it has none",
                         cmd("gcloud", "pubsub", "subscriptions", "create", f"{dlq}-hold", f"--topic={dlq}",
                             "--message-retention-duration=7d", f"--project={p}"))

    def subscriptions(self, topic: str) -> list[dict] | None:
        p = self.t.project
        what = f"the subscriptions of topic {topic}"
        ok, body = self.read(f"{self.t.pubsub}/v1/projects/{p}/topics/{topic}/subscriptions?pageSize=1000", what,
                             cmd("gcloud", "pubsub", "topics", "list-subscriptions", topic, f"--project={p}"))
        if not ok:
            return None
        out = []
        for name in (body or {}).get("subscriptions", []):
            ok, sub = self.read(f"{self.t.pubsub}/v1/{name}", f"subscription {name}",
                                cmd("gcloud", "pubsub", "subscriptions", "describe", name))
            if ok and sub is not None:
                out.append(sub)
        return out

    def check_trigger(self, role: str, topic: str, subs: list[dict], dlq: str) -> None:
        fn, p = TRIGGERS[role], self.t.project
        push = [s for s in subs if (s.get("pushConfig") or {}).get("pushEndpoint")]
        if not self.add(f"topic {topic} has the push subscription that triggers {fn}", bool(push),
                        "no push subscription", self.deploy_fix(fn, topic)):
            return
        full = f"projects/{p}/topics/{dlq}"
        for s in push:
            policy = s.get("deadLetterPolicy") or {}
            self.add(f"subscription {s['name']} ({fn}) has a dead-letter policy to {dlq}",
                     policy.get("deadLetterTopic") == full,
                     f"its dead-letter topic is {policy.get('deadLetterTopic') or 'not set'}",
                     cmd("gcloud", "pubsub", "subscriptions", "update", s["name"], f"--dead-letter-topic={dlq}",
                         "--max-delivery-attempts=10", f"--project={p}"))

    def deploy_fix(self, fn: str, topic: str) -> str:
        return cmd("gcloud", "functions", "deploy", fn, "--gen2", "--runtime=python312", f"--region={self.t.region}",
                   "--source=.", f"--entry-point={fn}", f"--trigger-topic={topic}", "--retry",
                   f"--service-account={self.t.service_account}", f"--project={self.t.project}")

    # Firestore: the ledger's database exists.
    def check_firestore(self) -> None:
        p, db = self.t.project, self.t.firestore_database
        what = f"Firestore database {db} exists"
        fix = cmd("gcloud", "firestore", "databases", "create", f"--database={db}", f"--location={self.t.region}",
                  "--type=firestore-native", f"--project={p}")
        url = f"{self.t.firestore}/v1/projects/{p}/databases/{db}"
        if self.t.local:  # the emulator has every database; reading a document list shows it answers
            url += "/documents/preflight?pageSize=1"
        ok, body = self.read(url, what, fix)
        if ok:
            self.add(what, body is not None or self.t.local, "not found", fix)

    # Google Cloud only: the runtime account's roles, the Cloud Scheduler job, the functions' retry setting.
    def check_runtime_account(self) -> None:
        p, sa = self.t.project, self.t.service_account
        policy = self.policy(p)
        for role in RUNTIME_ROLES:
            self.check_bound(sa, role, f"project {p}", policy, cmd(
                "gcloud", "projects", "add-iam-policy-binding", p, f"--member=serviceAccount:{sa}", f"--role={role}",
                "--condition=None"))
        self.check_runner_role(policy)
        self.check_publisher(policy)

    def check_bound(self, sa: str, role: str, where: str, policy, fix: str) -> None:
        what = f"runtime account {sa} has {role} on {where}"
        if isinstance(policy, CallFailed):
            self.add(what, False, str(policy), fix)
        else:
            self.add(what, role in iam.project_roles(policy, sa), "not bound", fix)

    def check_runner_role(self, policy) -> None:
        """deploy.sh's custom role: on the project, or on each of HEALTHCARE_DATASETS when they are given."""
        p, sa = self.t.project, self.t.service_account
        role = f"projects/{p}/roles/dicomExportRunner"
        if not self.t.healthcare_datasets:
            self.check_bound(sa, role, f"project {p}", policy, cmd(
                "gcloud", "projects", "add-iam-policy-binding", p, f"--member=serviceAccount:{sa}", f"--role={role}",
                "--condition=None"))
            return
        for ds in self.t.healthcare_datasets:
            _, dp, _, loc, _, name = ds.split("/")
            fix = cmd("gcloud", "healthcare", "datasets", "add-iam-policy-binding", name, f"--location={loc}",
                      f"--project={dp}", f"--member=serviceAccount:{sa}", f"--role={role}", "--condition=None")
            try:
                ds_policy: dict | CallFailed = self.http.get(
                    f"{self.t.healthcare}/{self.t.healthcare_version}/{ds}:getIamPolicy",
                    f"the IAM policy of {ds}") or {}
            except CallFailed as e:
                ds_policy = e
            self.check_bound(sa, role, ds, ds_policy, fix)

    def check_publisher(self, policy) -> None:
        p, sa = self.t.project, self.t.service_account
        for role in ("requests", "events"):
            topic = self.t.topics[role]
            what = f"runtime account {sa} may publish to {topic}"
            fix = cmd("gcloud", "pubsub", "topics", "add-iam-policy-binding", topic, f"--project={p}",
                      f"--member=serviceAccount:{sa}", "--role=roles/pubsub.publisher")
            try:
                topic_policy = self.http.get(f"{self.t.pubsub}/v1/projects/{p}/topics/{topic}:getIamPolicy",
                                             f"the IAM policy of topic {topic}") or {}
            except CallFailed as e:
                self.add(what, False, str(e), fix)
                continue
            on_project = set() if isinstance(policy, CallFailed) else iam.project_roles(policy, sa)
            self.add(what, bool((iam.project_roles(topic_policy, sa) | on_project) & PUBLISHER_ROLES),
                     "no roles/pubsub.publisher on the topic or the project", fix)

    def check_scheduler(self) -> None:
        p, r, topic = self.t.project, self.t.region, self.t.topics["poll"]
        what = f"Cloud Scheduler job {SCHEDULER_JOB} ({r}) publishes to {topic}"
        fix = cmd("gcloud", "scheduler", "jobs", "create", "pubsub", SCHEDULER_JOB, f"--location={r}",
                  "--schedule=* * * * *", f"--topic=projects/{p}/topics/{topic}", '--message-body={"tick":true}',
                  f"--project={p}")
        ok, job = self.read(f"https://cloudscheduler.googleapis.com/v1/projects/{p}/locations/{r}/jobs/"
                            f"{SCHEDULER_JOB}", what, fix)
        if ok:
            target_topic = ((job or {}).get("pubsubTarget") or {}).get("topicName")
            if job is not None and target_topic != f"projects/{p}/topics/{topic}":
                fix = fix.replace(" create ", " update ", 1)
            self.add(what, target_topic == f"projects/{p}/topics/{topic}",
                     "not found" if job is None else f"it publishes to {target_topic}", fix)

    def check_functions(self) -> None:
        p, r = self.t.project, self.t.region
        for role, fn in TRIGGERS.items():
            topic = self.t.topics.get(role)
            if topic is None:
                continue
            what = f"function {fn} is deployed with retry on failure"
            ok, body = self.read(f"https://cloudfunctions.googleapis.com/v2/projects/{p}/locations/{r}/functions/{fn}",
                                 what, self.deploy_fix(fn, topic))
            if ok:
                retry = ((body or {}).get("eventTrigger") or {}).get("retryPolicy")
                self.add(what, retry == "RETRY_POLICY_RETRY",
                         "not deployed" if body is None else f"its retry policy is {retry or 'not set'}",
                         self.deploy_fix(fn, topic))


# -- command ----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--project", help="the functions' project (default GOOGLE_CLOUD_PROJECT)")
    p.add_argument("--region", default=env("REGION", "us-central1"), help="functions and scheduler region")
    p.add_argument("--poll-topic", default=env("POLL_TOPIC", "dicom-export-poll"))
    p.add_argument("--dead-letter-topic", default=env("DEAD_LETTER_TOPIC", "dicom-export-dead-letter"))
    p.add_argument("--ingest-topic", default=env("INGEST_TOPIC") or None,
                   help="the routed stores' notification topic (INGEST_TOPIC)")
    p.add_argument("--service-account", default=env("SERVICE_ACCOUNT", "dicom-export"), help="runtime account id")
    p.add_argument("--healthcare-datasets", default=env("HEALTHCARE_DATASETS", ""),
                   help="projects/P/locations/L/datasets/D,... the runtime account may export from (deploy.sh's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for each call (default 10)")


def main(args, out=print) -> int:
    import config
    from handlers.adapters import transport

    try:
        settings = config.load()
    except config.SettingsError as e:
        out(f"✗ settings: {e}; fix: correct the environment variable it names")
        return 1
    t = target(settings, args)
    transport.configure(concurrency=4)
    tokens = transport.Tokens() if t.local else transport.Adc()
    pf = Preflight(t, Http(tokens, args.timeout))
    out(f"preflight of project {t.project} ({'local stack' if t.local else 'Google Cloud'})")
    results = pf.run()
    for r in results:
        out(r.line())
    for n in pf.notes:
        out(f"  note: {n}")
    failed = sum(not r.ok for r in results)
    out(f"{len(results)} checks, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m stack.preflight")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
