"""handlers/core/reconcile.py: comparing per-study counts, instance lists, bounded work and the report."""
from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.core import reconcile as R


def test_differing_studies_keep_the_window_order():
    store = {"3": 2, "1": 1, "2": 2, "4": 1}
    table = {"1": (1, 1), "2": (3, 2), "4": (1, 1), "9": (5, 5)}
    assert R.differing(store, table) == ["3", "2"]  # 3 absent, 2 duplicated; 9 is not in the window


def test_absence_candidates_are_table_studies_outside_the_window_in_uid_order():
    table = {s: (1, 1) for s in ("5", "1", "3", "7", "9")}
    assert R.absence_candidates(table, {"3"}, "", 3) == ["1", "5", "7"]
    assert R.absence_candidates(table, {"3"}, "5", 3) == ["7", "9"]


def test_diff_names_missing_extra_and_duplicated_instances():
    a, b, c, d = (R.instance_path("1", "2", x) for x in "abcd")
    got = R.diff([a, b, c], [(b, 1), (c, 2), (d, 1), (d, 1)])
    assert got == R.Diff(missing=(a,), extra=(d,), duplicated=(c,))
    assert R.heals(got) == [(a, False), (c, False), (d, True)]


def test_work_is_bounded_and_the_cursor_goes_on_where_it_stopped():
    window = ["a", "b", "c", "d"]
    store = {"a": 5, "b": 5, "c": 5, "d": 5}
    cur = R.Cursor(offset=100, table_after="x", passes=2)
    w = R.plan_work(cur, window, store, ["b", "c", "d"], end=True, max_instances=10)
    assert w.studies == ["b", "c"] and w.cursor == R.Cursor(103, "x", 2) and not w.complete
    w = R.plan_work(cur, window, store, ["d"], end=True, max_instances=1)  # one study always fits
    assert w.studies == ["d"] and w.cursor == R.Cursor(0, "x", 3) and w.complete
    w = R.plan_work(cur, window, store, [], end=False, max_instances=1)
    assert w.studies == [] and w.cursor == R.Cursor(104, "x", 2)


def test_cursor_round_trips():
    c = R.Cursor(7, "1.2", 3)
    assert R.Cursor.of({"cursor": c.fields()}) == c
    assert R.Cursor.of(None) == R.Cursor()


def test_statements_and_required_columns():
    assert R.study_counts_sql("bq://p-1.d.t", only_studies=False) == (
        "SELECT StudyInstanceUID, COUNT(*) AS n_rows, COUNT(DISTINCT SOPInstanceUID) AS n_instances "
        "FROM `p-1.d.t` GROUP BY 1")
    assert "IN UNNEST(@studies)" in R.study_counts_sql("bq://p-1.d.t", only_studies=True)
    assert R.missing_columns([{"name": "StudyInstanceUID"}, {"name": "SeriesInstanceUID"}]) == ["SOPInstanceUID"]


def test_event_carries_the_counts_and_the_type_attribute():
    r = R.Report(studies_compared=800, missing=3, extra=2, duplicated=1, healed=6, api_calls=12, complete=True)
    e = R.event("run-1", "projects/p/locations/l/datasets/d/dicomStores/s", "bq://p.d.t", r, R.Cursor(),
                datetime(2026, 12, 2, tzinfo=timezone.utc))
    assert e["attributes"]["eventType"] == "TABLE_RECONCILED" and e["eventId"] == "run-1:TABLE_RECONCILED"
    assert {k: e["data"][k] for k in ("studiesCompared", "instancesMissing", "instancesExtra",
                                      "instancesDuplicated", "healed", "apiCalls")} == {
        "studiesCompared": 800, "instancesMissing": 3, "instancesExtra": 2, "instancesDuplicated": 1, "healed": 6,
        "apiCalls": 12}
    assert e["data"]["time"] == "2026-12-02T00:00:00Z"


uids = st.sampled_from([R.instance_path(s, "1", i) for s in "12" for i in "abc"])


@settings(max_examples=100, deadline=None)
@given(st.sets(uids), st.lists(st.tuples(uids, st.integers(1, 3))))
def test_heals_applied_make_the_table_the_store(store, rows):
    """Deleting the rows of every healed instance and exporting the stored ones leaves one row each."""
    d = R.diff(store, rows)
    healed = {p for p, _ in R.heals(d)}
    table = [(p, n) for p, n in rows if p not in healed] + [(p, 1) for p, deleted in R.heals(d) if not deleted]
    assert R.diff(store, table) == R.Diff()
    assert sorted(p for p, _ in table) == sorted(store) and all(n == 1 for _, n in table)
