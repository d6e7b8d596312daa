"""The service's functions, in three kinds of room:

- one module per function, its decisions only: intake.py (export_request), poller.py (poll_exports),
  ingest.py (ingest_notification), status.py (export_status);
- core/: pure rules and records (request validation, event bodies, the ledger document, the ingest
  documents, the outbox), no I/O, no settings, no adapters;
- adapters/: one module per external system (transport.py, the one HTTP transport; healthcare, firestore,
  pubsub, gcs, logs) and the Firestore stores of the core records (ledger_store.py, batch_store.py).

wiring.py builds the adapters from the settings, once per instance: the only place an adapter gets a setting.
"""
