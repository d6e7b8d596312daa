"""INGEST_* settings (config/): validated at start, each bad value naming its variable. Pure, no services."""
from __future__ import annotations

import json

import pytest

import config

STORE = "projects/my-proj/locations/us-central1/datasets/d/dicomStores/s"


def load(**env):
    return config.load({k: v if isinstance(v, str) else json.dumps(v) for k, v in env.items()})


def test_defaults_and_a_valid_route():
    s = load()
    assert (s.ingest_routes, s.ingest_filter_bucket, s.ingest_batch_max_instances, s.ingest_batch_max_age_s) == \
        ((), None, 1000, 60.0)
    s = load(INGEST_ROUTES={STORE: "bq://my-proj.ds.t"}, INGEST_FILTER_BUCKET="my-filters",
             INGEST_BATCH_MAX_INSTANCES="250", INGEST_BATCH_MAX_AGE_S="15")
    assert s.ingest_routes == ((STORE, "bq://my-proj.ds.t"),) and s.ingest_route_options == ()
    assert (s.ingest_filter_bucket, s.ingest_batch_max_instances, s.ingest_batch_max_age_s) == ("my-filters", 250, 15)
    s = load(INGEST_ROUTES={STORE: {"tableUri": "bq://my-proj.ds.t", "schemaJson": {}}}, INGEST_FILTER_BUCKET="b-1")
    assert s.ingest_routes == ((STORE, "bq://my-proj.ds.t"),)
    assert s.ingest_route_options == ((STORE, '{"schemaJson":{}}'),)
    assert load(INGEST_ROUTES="{}", INGEST_FILTER_BUCKET="").ingest_routes == ()  # deploy.sh's defaults


@pytest.mark.parametrize("env, variable, words", [
    ({"INGEST_ROUTES": "[1]"}, "INGEST_ROUTES", "JSON object"),
    ({"INGEST_ROUTES": "{"}, "INGEST_ROUTES", "not JSON"),
    ({"INGEST_ROUTES": '{"%s": "bq://my-proj.ds.t", "%s": "bq://my-proj.ds.u"}' % (STORE, STORE),
      "INGEST_FILTER_BUCKET": "bkt"}, "INGEST_ROUTES", "more than once"),
    ({"INGEST_ROUTES": {STORE: "bq://my-proj.ds.t"}}, "INGEST_FILTER_BUCKET", "required"),
    ({"INGEST_ROUTES": {"stores/s": "bq://my-proj.ds.t"}, "INGEST_FILTER_BUCKET": "bkt"}, "INGEST_ROUTES",
     "full resource name"),
    ({"INGEST_ROUTES": {STORE: "my-proj.ds.t"}, "INGEST_FILTER_BUCKET": "bkt"}, "INGEST_ROUTES", "bq://"),
    ({"INGEST_ROUTES": {STORE: 5}, "INGEST_FILTER_BUCKET": "bkt"}, "INGEST_ROUTES", "must be a string"),
    ({"INGEST_ROUTES": {STORE: {"tableUri": "bq://my-proj.ds.t", "writeDisposition": "WRITE_TRUNCATE"}},
      "INGEST_FILTER_BUCKET": "bkt"}, "INGEST_ROUTES", "unknown: writeDisposition"),
    ({"INGEST_ROUTES": {STORE: "bq://my-proj.ds.t"}, "INGEST_FILTER_BUCKET": "bkt",
      "ALLOWED_BQ_DATASETS": "other.*"}, "INGEST_ROUTES", "ALLOWED_BQ_DATASETS"),
    ({"INGEST_ROUTES": {STORE: "bq://my-proj.ds.t"}, "INGEST_FILTER_BUCKET": "bkt",
      "ALLOWED_DICOM_STORES": "projects/other/*"}, "INGEST_ROUTES", "ALLOWED_DICOM_STORES"),
    ({"INGEST_FILTER_BUCKET": "Bad_Bucket"}, "INGEST_FILTER_BUCKET", "not a valid bucket name"),
    ({"INGEST_BATCH_MAX_INSTANCES": "0"}, "INGEST_BATCH_MAX_INSTANCES", "at least 1"),
    ({"INGEST_BATCH_MAX_INSTANCES": "5000"}, "INGEST_BATCH_MAX_INSTANCES", "at most 2000"),
    ({"INGEST_BATCH_MAX_INSTANCES": "ten"}, "INGEST_BATCH_MAX_INSTANCES", "integer"),
    ({"INGEST_BATCH_MAX_AGE_S": "0.1"}, "INGEST_BATCH_MAX_AGE_S", "at least 1"),
])
def test_a_bad_value_stops_the_function_naming_the_variable(env, variable, words):
    with pytest.raises(config.SettingsError) as e:
        load(**env)
    assert str(e.value).startswith(variable) and words in str(e.value), str(e.value)
