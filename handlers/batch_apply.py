"""Applying an ingest batch to its table, under the table lock (docs/design.md, "Deletions and replacements",
"Failed batches"). The ingest function's decisions once a batch holds its table:

  begin    the batch's DML job (delete the rows of every instance it touches: handlers/core/changes.py),
           recorded on the batch for this attempt before anything else, then its export request; a batch of
           deletions only has no export and is done at once;
  failed   an attempt failed (its export request ended badly, or BigQuery refused the DML): the batch keeps
           the table (later changes of its instances must wait for it) and is tried again after a backoff,
           at most INGEST_BATCH_MAX_ATTEMPTS times; then it is FAILED, the table is released, and an ERROR
           entry and an INGEST_BATCH_FAILED event name the batch, the cause and the remedy;
  retry    a RETRYING batch whose time has come: its next attempt (a new requestId), from its DML on.

Every step is recorded before the next, so whoever finds the batch part-way (the next notification or the
poller's tick) goes on from there: the DML of an attempt runs again only if it was not recorded, and no row
of that attempt has been appended before it is (its export is requested after).
"""
from __future__ import annotations

from typing import Any, Callable

from handlers.adapters import logs
from handlers.core import batches as B
from handlers.core import changes as C
from handlers.core.clock import now

Doc = dict[str, Any]


class Apply:
    def __init__(self, settings: Any, ledger: Any, bq: Any, events: Any, publish: Callable[[Doc], None]):
        self.s, self.ledger, self.bq, self.events, self.publish = settings, ledger, bq, events, publish

    def begin(self, b: Doc) -> bool:
        """A claimed batch (PUBLISHING): its DML for this attempt, then its request. True when the table was
        released (the batch is done, or failed for good)."""
        from handlers.adapters.transport import HttpError

        attempt = int(b.get("attempt") or 1)
        plan = C.Plan.of(b)
        if b.get("deletedAttempt") != attempt:
            try:
                rows, job = self.delete_rows(b, plan, attempt)
            except HttpError as e:  # a final refusal (not a missing table): this attempt failed
                return self.failed(b, {"step": "delete", "error": {"code": e.http_status, "message": e.message}})
            if not self.ledger.update_batch_if(b["batchId"], (B.PUBLISHING,), {
                    "deletedAttempt": attempt, "rowsDeleted": rows, "dmlJob": job}):
                return False
            logs.info("ingest batch rows deleted", ingestBatch=b["batchId"], attempt=attempt, rowsDeleted=rows,
                      deletedInstances=len(plan.sops), exportedInstances=len(plan.export_paths), tableUri=b["tableUri"])
        if plan.export_paths:
            self.publish(b)
            return False
        done = {"state": B.EXPORTED, "requestState": None, "doneAt": now(), "expireAt": now() + B.BATCH_RETENTION}
        if not self.ledger.release_table(b["tableKey"], b["batchId"], done):
            return False
        logs.info("ingest batch applied (deletions only: nothing to export)", ingestBatch=b["batchId"],
                  tableUri=b["tableUri"])
        return True

    def delete_rows(self, b: Doc, plan: C.Plan, attempt: int) -> tuple[int, str | None]:
        """(rows deleted, the DML job's id); (0, None) when the table does not exist yet. The job's id is the
        attempt's (C.dml_job_id): whoever finds the batch part-way submits the same job, which BigQuery runs
        once, so a late copy can never delete rows the attempt's export has appended since."""
        from handlers.adapters.transport import HttpError

        job_id = C.dml_job_id(self.ledger.prefix, b, attempt)
        try:
            r = self.bq.run_once(C.delete_statement(b["tableUri"]), C.parameters(plan), job_id,
                                 table_uri=b["tableUri"])
        except HttpError as e:
            if e.http_status == 404:
                return 0, None
            raise
        return r.affected, r.job_id

    def failed(self, b: Doc, cause: Doc) -> bool:
        """This attempt failed: RETRYING after a backoff, or FAILED for good (table released, ERROR, event)."""
        attempt = int(b.get("attempt") or 1)
        t = now()
        history = [*(b.get("failures") or []), {"attempt": attempt, "at": t, **cause}]
        at = C.retry_at(attempt, self.s.ingest_batch_max_attempts, self.s.ingest_retry_backoff_s, t)
        fields = dict(ingestBatch=b["batchId"], attempt=attempt, cause=cause, tableUri=b["tableUri"],
                      instances=b.get("instances"), filterUri=b.get("filterUri"))
        if at is not None:
            if self.ledger.update_batch_if(b["batchId"], (B.PUBLISHING, B.PUBLISHED), {
                    "state": B.RETRYING, "nextAttemptAt": at, "failures": history}):
                logs.warning(f"ingest batch attempt {attempt} failed; the batch keeps its table and is tried "
                             f"again at {at.isoformat()}", **fields)
            return False
        event = C.failed_event(b, attempt, cause, t)
        updates = {"state": B.FAILED, "failures": history, "error": cause.get("error"),
                   "requestState": cause.get("requestState"), "doneAt": t, "expireAt": t + B.BATCH_RETENTION,
                   "eventPending": True, f"events.{C.BATCH_FAILED}": {**event, "published": False}}
        if not self.ledger.release_table(b["tableKey"], b["batchId"], updates):
            return False
        logs.error(f"ingest batch NOT applied after {attempt} attempts: its changes are not in the table. "
                   + C.FAILED_REMEDY, remedy=C.FAILED_REMEDY, **fields)
        self.publish_event(b["batchId"], event)
        return True

    def retry(self, b: Doc) -> bool:
        """A RETRYING batch: once its time has come, its next attempt. True when the table was released."""
        if now() < b["nextAttemptAt"]:
            return False
        n = int(b.get("attempt") or 1) + 1
        updates = {"state": B.PUBLISHING, "attempt": n, "requestId": C.attempt_request_id(b["batchId"], n),
                   "publishedAt": None, "messageId": None}
        if not self.ledger.update_batch_if(b["batchId"], (B.RETRYING,), updates):
            return False
        logs.info(f"ingest batch: attempt {n}", ingestBatch=b["batchId"], requestId=updates["requestId"])
        return self.begin({**b, **updates})

    def publish_event(self, batch_id: str, event: Doc) -> None:
        """The outbox's last two steps for INGEST_BATCH_FAILED: publish, then record the publication. A failure
        leaves it recorded (`eventPending`) for the poller's tick (`sweep`)."""
        from handlers.core.errors import PublishError

        try:
            message_id = self.events.publish(event["data"], event["attributes"])
        except PublishError as e:
            logs.warning("INGEST_BATCH_FAILED not published yet; the next tick publishes it", ingestBatch=batch_id,
                         problem=str(e))
            return
        key = f"events.{C.BATCH_FAILED}"
        self.ledger.update_batch_if(batch_id, (B.FAILED,), {"eventPending": False, f"{key}.published": True,
                                                            f"{key}.publishedAt": now(), f"{key}.messageId": message_id})

    def sweep(self) -> int:
        """Publish the recorded INGEST_BATCH_FAILED events that are not known to be published."""
        pending = self.ledger.failed_unpublished()
        for b in pending:
            self.publish_event(b["batchId"], b["events"][C.BATCH_FAILED])
        return len(pending)
