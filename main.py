"""Cloud Functions entry points (docs/contract.md, "Settings"; docs/design.md, "Architecture"). Thin: each
delegates to its module in handlers/, which gets its clients from handlers/wiring.py.

Module import stays light (settings only); each function imports its handler, and the handler
its Google clients, on first use.
"""
import os
from typing import Any

import functions_framework

import config
from handlers.adapters import logs

try:
    SETTINGS = config.get()
except config.SettingsError as e:
    logs.critical(f"invalid setting, the function cannot start: {e}")
    raise

if os.environ.get("FUNCTION_TARGET", "export_request") == "export_request":
    if not SETTINGS.allowed_dicom_stores:
        logs.warning("ALLOWED_DICOM_STORES is not set: requests may export from every DICOM store this "
                     "service account can read")
    if not SETTINGS.allowed_bq_datasets:
        logs.warning("ALLOWED_BQ_DATASETS is not set: requests may export to every BigQuery dataset the "
                     "Healthcare service agent can write")


if os.environ.get("FUNCTION_TARGET") == "ingest_notification" and not SETTINGS.ingest_routes:
    logs.warning("INGEST_ROUTES is empty: ingest_notification ignores every notification")


@functions_framework.cloud_event
def export_request(cloud_event: Any) -> None:
    """Pub/Sub messagePublished on EXPORT_REQUESTS_TOPIC: validate, record, start the export, tell consumers.
    Returning acknowledges the message; raising makes Pub/Sub redeliver it."""
    from handlers import intake

    try:
        intake.handle(cloud_event)
    except intake.Redeliver as e:
        # Expected and already logged: answer 503, which Pub/Sub treats as a nack, without a traceback.
        from werkzeug.exceptions import ServiceUnavailable
        raise ServiceUnavailable(str(e)) from None


@functions_framework.cloud_event
def ingest_notification(cloud_event: Any) -> None:
    """Pub/Sub messagePublished on a DICOM store's notification topic: record the stored or deleted instance
    for the next batch of its route, which deletes its rows and exports what the store has (INGEST_ROUTES;
    docs/design.md, "Ingest", "Deletions and replacements"). Returning
    acknowledges (the arrival is recorded); raising makes Pub/Sub redeliver the notification."""
    from handlers import ingest

    ingest.handle(cloud_event)


@functions_framework.cloud_event
def poll_exports(cloud_event: Any) -> None:
    """Pub/Sub on the poll topic (Cloud Scheduler's tick): follow every running export to its end and
    publish its terminal event (handlers/poller.py). Always acknowledges: the next tick retries."""
    from handlers import poller

    poller.handle(cloud_event)


@functions_framework.http
def export_status(request: Any) -> Any:
    """HTTP GET ?requestId=ID: the request's ledger record as JSON; 404 unknown, 400 malformed
    (handlers/status.py). IAM-protected (deploy.sh: --no-allow-unauthenticated)."""
    from handlers import status

    return status.handle(request)


@functions_framework.cloud_event
def reconcile_tables(cloud_event: Any) -> None:
    """Pub/Sub on the reconcile topic (Cloud Scheduler's tick): compare each routed table with its DICOM store
    and heal what differs through ingest batches (handlers/reconcile.py). Always acknowledges."""
    from handlers import reconcile

    reconcile.handle(cloud_event)
