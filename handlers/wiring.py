"""Wiring: the adapters of this instance, built from the settings once (on first use) and shared.

This is the only place an adapter gets a setting: the function modules ask here for their clients
(`intake()`, `poller()`, `ingest()`, `ledger()`), and tests point every client at emulators with
`use(settings)` (or `reset()` to read the environment again). The `*_for(settings)` builders make new
clients for given settings (tests and benchmarks that run several configurations side by side).
Adapters are imported inside the builders, so a cold start imports only what its function uses.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import config
from handlers.core.lazy import Once, once

if TYPE_CHECKING:
    from handlers.adapters.batch_store import IngestLedger
    from handlers.adapters.bigquery import BigQuery
    from handlers.adapters.dicomweb import DicomWeb
    from handlers.adapters.firestore import Firestore
    from handlers.adapters.gcs import FilterFiles
    from handlers.adapters.healthcare import Healthcare
    from handlers.adapters.ledger_store import Ledger
    from handlers.adapters.pubsub import Events
    from handlers.adapters.reconcile_state import ReconcileState
    from handlers.adapters.resource_manager import ResourceManager
    from handlers.adapters.transport import Tokens

_chosen: list[config.Settings] = []


def settings() -> config.Settings:
    """The settings the adapters are built from: those given to use(), else the environment's."""
    return _chosen[0] if _chosen else config.get()


def use(s: config.Settings | None) -> None:
    """Build every adapter from `s` from now on (None: from the environment again); forget those built."""
    _chosen.clear()
    if s is not None:
        _chosen.append(s)
    for made in _CACHED:
        made.reset()


def reset() -> None:
    """Read the environment again (config.load) and forget every adapter built."""
    config.reload()
    use(None)


# -- builders: new clients for given settings ---------------------------------------------------------------
def tokens_for(s: config.Settings) -> Tokens:
    from handlers.adapters import transport
    return transport.cloud_tokens(metadata_host=s.metadata_host, on_google_cloud=s.on_google_cloud,
                                  credentials_file=s.credentials_file)


@once
def _tokens() -> Tokens:
    """The process's token source for Google's endpoints."""
    return tokens_for(settings())


def firestore_for(s: config.Settings) -> Firestore:
    from handlers.adapters import transport
    from handlers.adapters.firestore import Firestore
    transport.configure(concurrency=s.poll_concurrency)
    return Firestore(config.project_id(s), database=s.firestore_database, emulator_host=s.firestore_emulator_host,
                     tokens=None if s.firestore_emulator_host else _tokens())


def ledger_for(s: config.Settings, collection: str | None = None, client: Firestore | None = None) -> Ledger:
    from handlers.adapters.ledger_store import Ledger
    return Ledger(collection or s.ledger_collection, client or _firestore())


def batch_store_for(s: config.Settings, collection: str | None = None,
                    client: Firestore | None = None) -> IngestLedger:
    from handlers.adapters.batch_store import IngestLedger
    return IngestLedger(collection or s.ledger_collection, client or _firestore())


def publisher_for(s: config.Settings, topic: str, *, timeout_s: float = 30.0) -> Events:
    from handlers.adapters import transport
    from handlers.adapters.pubsub import Events
    transport.configure(concurrency=s.poll_concurrency)
    host = s.pubsub_emulator_host
    return Events(config.project_id(s), topic, timeout_s=timeout_s, emulator_host=host,
                  tokens=None if host else _tokens())


def healthcare_for(s: config.Settings, *, timeout_s: float, budget_s: float) -> Healthcare:
    """A local emulator (a loopback endpoint) gets no token unless an ADC file is configured
    (GOOGLE_APPLICATION_CREDENTIALS) or the function runs on Google Cloud."""
    from handlers.adapters import transport
    from handlers.adapters.healthcare import Healthcare
    transport.configure(concurrency=s.poll_concurrency)
    needs_token = not s.healthcare_is_local or s.credentials_file or s.on_google_cloud
    return Healthcare(s.healthcare_endpoint, s.healthcare_version, local=s.healthcare_is_local, timeout_s=timeout_s,
                      budget_s=budget_s, tokens=_tokens() if needs_token else None)


def filter_files_for(s: config.Settings, bucket: str | None = None) -> FilterFiles:
    from handlers.adapters import transport
    from handlers.adapters.gcs import FilterFiles
    transport.configure(concurrency=s.poll_concurrency)
    host = s.storage_emulator_host
    return FilterFiles(bucket or s.ingest_filter_bucket or "", config.project_id(s), emulator_host=host,
                       tokens=None if host else _tokens())


def resource_manager_for(s: config.Settings) -> ResourceManager:
    """Project numbers, for an export failure's remedy. A loopback (emulator) endpoint gets no token unless an
    ADC file is configured or the function runs on Google Cloud, as for the Healthcare API."""
    from handlers.adapters import transport
    from handlers.adapters.resource_manager import ResourceManager
    transport.configure(concurrency=s.poll_concurrency)
    local = config.is_loopback_url(s.resource_manager_endpoint)
    needs_token = not local or s.credentials_file or s.on_google_cloud
    return ResourceManager(s.resource_manager_endpoint, timeout_s=min(s.poll_call_timeout_s, 10.0),
                           tokens=_tokens() if needs_token else None)


def bigquery_for(s: config.Settings) -> BigQuery:
    """BigQuery (BIGQUERY_API_ENDPOINT); a local emulator gets no token, as for the Healthcare API."""
    from handlers.adapters import transport
    from handlers.adapters.bigquery import BigQuery
    transport.configure(concurrency=s.poll_concurrency)
    needs_token = not s.bigquery_is_local or s.credentials_file or s.on_google_cloud
    return BigQuery(s.bigquery_endpoint, config.project_id(s), tokens=_tokens() if needs_token else None,
                    timeout_s=s.healthcare_http_timeout_s, budget_s=s.healthcare_retry_budget_s)


def dicomweb_for(s: config.Settings) -> DicomWeb:
    """QIDO-RS searches of the stores (HEALTHCARE_API_ENDPOINT)."""
    from handlers.adapters import transport
    from handlers.adapters.dicomweb import DicomWeb
    transport.configure(concurrency=s.poll_concurrency)
    needs_token = not s.healthcare_is_local or s.credentials_file or s.on_google_cloud
    return DicomWeb(s.healthcare_endpoint, s.healthcare_version, tokens=_tokens() if needs_token else None,
                    timeout_s=s.healthcare_http_timeout_s, budget_s=s.healthcare_retry_budget_s)


def reconcile_for(s: config.Settings) -> tuple[ReconcileState, ReconcileState, DicomWeb, BigQuery, Events]:
    """New (reconcile state, ingest ledger, DICOMweb, BigQuery, events publisher) for settings `s`: the reconcile
    state is the ingest ledger with the route's reconcile documents."""
    from handlers.adapters.reconcile_state import ReconcileState
    state = ReconcileState(s.ledger_collection, _firestore())
    return state, state, dicomweb_for(s), bigquery_for(s), publisher_for(s, s.events_topic)


def poller_for(s: config.Settings) -> tuple[Ledger, Healthcare, Events]:
    """New (ledger, healthcare, events) for settings `s`, sized for the poller's concurrency."""
    return (ledger_for(s), healthcare_for(s, timeout_s=s.poll_call_timeout_s, budget_s=s.poll_call_timeout_s),
            publisher_for(s, s.events_topic, timeout_s=s.poll_call_timeout_s))


# -- this instance's clients, one per process ---------------------------------------------------------------
@once
def _firestore() -> Firestore:
    """One Firestore client per process (shared by the request and ingest ledgers)."""
    return firestore_for(settings())


@once
def ledger() -> Ledger:
    """The request ledger (export_status, and everything else through the bundles below)."""
    return ledger_for(settings())


@once
def intake() -> tuple[Ledger, Healthcare, Events]:
    """(ledger, healthcare, events) of export_request."""
    s = settings()
    return (ledger(), healthcare_for(s, timeout_s=s.healthcare_http_timeout_s, budget_s=s.healthcare_retry_budget_s),
            publisher_for(s, s.events_topic))


@once
def poller() -> tuple[Ledger, Healthcare, Events]:
    """(ledger, healthcare, events) of poll_exports, sized for its concurrency."""
    return poller_for(settings())


@once
def ingest() -> tuple[IngestLedger, Ledger, FilterFiles, Events, BigQuery, Events]:
    """(ingest ledger, request ledger, filter files, requests publisher, BigQuery, events publisher) of
    ingest_notification (and of the poller's tick, which advances the batches)."""
    s = settings()
    return (batch_store_for(s), ledger(), filter_files_for(s), publisher_for(s, s.requests_topic), bigquery_for(s),
            publisher_for(s, s.events_topic))


@once
def resource_manager() -> ResourceManager:
    """This instance's project numbers (asked only when an export failed for want of BigQuery grants)."""
    return resource_manager_for(settings())


@once
def reconcile() -> tuple[ReconcileState, ReconcileState, DicomWeb, BigQuery, Events]:
    """(reconcile state, ingest ledger, DICOMweb, BigQuery, events publisher) of reconcile_tables."""
    return reconcile_for(settings())


_CACHED: tuple[Once[Any], ...] = (_tokens, _firestore, ledger, intake, poller, ingest, reconcile, resource_manager)
