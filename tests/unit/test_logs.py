"""Structured logs and where the Google APIs are: in-process, no emulator."""
from __future__ import annotations

import json

from handlers.adapters import logs


def test_log_entry_shape_trace_and_scrubbing(capsys):
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//pubsub",
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, {})
    trace, span = logs.trace_from(event, "my-proj")
    with logs.context(trace=trace, span=span, requestId="r1"):
        logs.bind(operation="projects/p/operations/1")
        logs.error("failed with Authorization: Bearer abc.def-123 and ya29.secret", field="f")
    line = json.loads(capsys.readouterr().out.strip())
    assert line["severity"] == "ERROR" and line["field"] == "f"
    assert line["logging.googleapis.com/trace"] == "projects/my-proj/traces/0af7651916cd43dd8448eb211c80319c"
    assert line["logging.googleapis.com/spanId"] == "b7ad6b7169203331"
    assert line["logging.googleapis.com/labels"] == {"requestId": "r1", "operation": "projects/p/operations/1"}
    assert "abc.def-123" not in line["message"] and "ya29.secret" not in line["message"]
    logs.info("outside")
    assert "logging.googleapis.com/labels" not in json.loads(capsys.readouterr().out)


def test_where_google_is_comes_from_the_environment():
    import config
    s = config.load({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8081", "STORAGE_EMULATOR_HOST": "http://localhost:4443/",
                     "K_SERVICE": "export-request", "GCE_METADATA_HOST": "169.254.169.254", "FIRESTORE_DATABASE": "ledger"})
    assert (s.firestore_emulator_host, s.storage_emulator_host, s.pubsub_emulator_host) == (
        "127.0.0.1:8081", "localhost:4443", None)
    assert s.on_google_cloud and s.metadata_host == "169.254.169.254" and s.firestore_database == "ledger"
    assert not config.load({}).on_google_cloud and config.load({}).firestore_database == "(default)"


def test_a_hostile_field_name_never_splits_the_log_line(capsys):
    """A field name from a request can hold any character; U+0085 (NEL), U+2028 and U+2029 end a line for
    readers that split on Unicode line boundaries (Python's str.splitlines among them). Each entry stays one
    ASCII line, and decodes back to the same text."""
    name = "bigqueryDestination.x\x85y\u2028z\u2029é\x1c"
    logs.error(f"export request rejected: unknown field {name!s}", field=name)
    out = capsys.readouterr().out
    assert out.isascii() and len(out.splitlines()) == 1
    line = json.loads(out)
    assert line["field"] == name and line["message"].endswith(name)


def test_a_label_bound_outside_a_delivery_never_reaches_a_later_entry(capsys):
    """bind() outside context(...) is a no-op: a worker thread serves many deliveries, and a label left
    on it would be stamped on the next delivery's entries."""
    import contextvars

    def outside_then_inside():
        logs.bind(logsUrl="http://leaked")
        with logs.context(requestId="r2"):
            logs.info("inside")
        logs.info("after")

    contextvars.Context().run(outside_then_inside)
    inside, after = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert inside["logging.googleapis.com/labels"] == {"requestId": "r2"}
    assert "logging.googleapis.com/labels" not in after
