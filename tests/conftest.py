"""Session fixtures: the real local services every test talks to over sockets.

Each service starts once per session, only when a test asks for it, and is stopped as a
process group at the end (gcloud's emulators leave a Java child otherwise).
"""
from __future__ import annotations

import shutil

import pytest

from tests.support import procs


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not on PATH: the test suite needs it (see README.md)", pytrace=False)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def gcs(logs_dir, tmp_path_factory):
    svc = procs.gcs_emulator(logs_dir, tmp_path_factory.mktemp("gcs")).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def hc(logs_dir, tmp_path_factory, gcs):
    """The Healthcare API emulator, with the GCS emulator for filter files."""
    data_dir = tmp_path_factory.mktemp("hc-data")
    svc = procs.healthcare_emulator(logs_dir, data_dir, env={"STORAGE_EMULATOR_HOST": gcs.url})
    svc.data_dir = data_dir
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def pubsub(logs_dir):
    _require("gcloud")
    _require("java")
    svc = procs.pubsub_emulator(logs_dir).start(timeout=90)
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def firestore(logs_dir):
    _require("gcloud")
    _require("java")
    svc = procs.firestore_emulator(logs_dir).start(timeout=90)
    yield svc
    svc.stop()


@pytest.fixture
def gcs_client(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project="test-project", credentials=AnonymousCredentials())
