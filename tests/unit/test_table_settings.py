"""Settings of deletions, re-driven batches and reconcile (config/)."""
from __future__ import annotations

import pytest

import config


def test_defaults():
    s = config.load({})
    assert s.bigquery_endpoint == "https://bigquery.googleapis.com" and not s.bigquery_is_local
    assert (s.ingest_batch_max_attempts, s.ingest_retry_backoff_s) == (5, 60.0)
    assert (s.reconcile_max_studies, s.reconcile_max_instances, s.reconcile_dry_run) == (5000, 20000, False)


def test_values():
    s = config.load({"BIGQUERY_API_ENDPOINT": "http://127.0.0.1:8080/", "INGEST_BATCH_MAX_ATTEMPTS": "3",
                     "INGEST_RETRY_BACKOFF_S": "0.5", "RECONCILE_MAX_STUDIES": "10", "RECONCILE_MAX_INSTANCES": "7",
                     "RECONCILE_DRY_RUN": "true"})
    assert s.bigquery_endpoint == "http://127.0.0.1:8080" and s.bigquery_is_local
    assert (s.ingest_batch_max_attempts, s.ingest_retry_backoff_s) == (3, 0.5)
    assert (s.reconcile_max_studies, s.reconcile_max_instances, s.reconcile_dry_run) == (10, 7, True)


@pytest.mark.parametrize("name, value", [
    ("BIGQUERY_API_ENDPOINT", "http://bigquery.example.com"), ("BIGQUERY_API_ENDPOINT", "ftp://127.0.0.1"),
    ("INGEST_BATCH_MAX_ATTEMPTS", "0"), ("INGEST_BATCH_MAX_ATTEMPTS", "101"), ("INGEST_RETRY_BACKOFF_S", "x"),
    ("RECONCILE_MAX_STUDIES", "0"), ("RECONCILE_MAX_INSTANCES", "-1"), ("RECONCILE_DRY_RUN", "yes please"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(config.SettingsError, match=name):
        config.load({name: value})
