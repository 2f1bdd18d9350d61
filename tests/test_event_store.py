"""Landing files -> hour partitions: idempotent, deduplicated, bad records quarantined with counts."""

import gzip
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg

from automl_assets.core import event_store, layout
from automl_assets.events import events
from automl_assets.runs import RANGE_END_TAG, RANGE_START_TAG
from tests.conftest import events_table, utc

LINES = [
    {"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:10:00.000001", "insert_id": "a"},
    {"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:10:00.000001", "insert_id": "a"},  # dupe
    {"event_type": "buy", "device_id": "d9", "event_time": "2026-03-01 06:00:00", "insert_id": "b"},
    {"event_type": "buy", "event_time": "2026-03-01 06:00:00", "insert_id": "c"},  # no user and no device
    {"event_type": "view", "user_id": "u2", "event_time": "yesterday", "insert_id": "d"},
]


def land(storage, name="export_2026-03-01_5#0.json.gz", lines=LINES):
    folder = storage.base / "landing" / "amplitude"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / name, "wt") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return folder / name


def materialise_hours(storage, instance):
    return dg.materialize(
        [events],
        instance=instance,
        resources={"storage": storage},
        tags={RANGE_START_TAG: "2026-03-01-05:00", RANGE_END_TAG: "2026-03-01-06:00"},
    )


def test_landed_file_becomes_hour_partitions_once(storage):
    source = land(storage)
    with dg.instance_for_test() as instance:
        first = materialise_hours(storage, instance)
        assert first.success
        metadata = first.asset_materializations_for_node("events")[0].metadata
        assert metadata["new_events"].value == 2
        assert metadata["quarantined"].value == {"missing_user_id": 1, "bad_event_time": 1}
        assert len(instance.get_materialized_partitions(dg.AssetKey("events"))) == 2  # one run, two hours

        hour5 = storage.read_table(*layout.events_hour(utc(2026, 3, 1, 5))).to_pylist()
        hour6 = storage.read_table(*layout.events_hour(utc(2026, 3, 1, 6))).to_pylist()
        assert [(e["user_id"], e["insert_id"]) for e in hour5] == [("u1", "a")]
        assert [(e["user_id"], e["event_type"]) for e in hour6] == [("device:d9", "buy")]
        assert storage.read_table(*layout.quarantine(event_store.file_digest(source))).num_rows == 2

        # The same bytes under another name, and a re-run: nothing new.
        shutil.copy(source, source.with_name("copy_2026-03-01_5#1.json.gz"))
        again = materialise_hours(storage, instance)
        assert again.asset_materializations_for_node("events")[0].metadata["new_events"].value == 0
        assert storage.read_table(*layout.events_hour(utc(2026, 3, 1, 5))).to_pylist() == hour5


def test_an_ingest_run_reports_what_its_files_quarantined_and_which_files_it_could_not_read(storage):
    """Files staged before the run (by the landing sensor or `automl ingest`) still have their quarantined records
    counted on the materialisation; an unreadable file fails a check naming it, and the other files are ingested."""
    event_store.stage_file(storage, land(storage))
    (storage.base / "landing" / "amplitude" / "broken_2026-03-01_5#1.json.gz").write_bytes(b"not gzip")
    with dg.instance_for_test() as instance:
        result = materialise_hours(storage, instance)
    assert result.success
    metadata = result.asset_materializations_for_node("events")[0].metadata
    assert metadata["quarantined"].value == {"bad_event_time": 1, "missing_user_id": 1}
    assert metadata["events"].value == 2 and metadata["unreadable_files"].value == 1
    checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    readable = checks["landing_files_readable"]
    assert not readable.passed and "broken_2026-03-01_5#1.json.gz" in readable.description


def test_a_landing_file_staged_before_is_not_read_again_until_it_changes(storage, monkeypatch):
    """Every ingest run looks at every file kept under landing/: one staged before and unchanged (size and time) is
    not hashed again; once rewritten it is."""
    source = land(storage)
    first = event_store.stage_landing_file(storage, source)
    assert first["newly_staged"]
    hashed = []
    digest = event_store.file_digest
    monkeypatch.setattr(event_store, "file_digest", lambda path: hashed.append(path) or digest(path))
    assert event_store.stage_landing(storage) == [{**first, "newly_staged": False}]
    assert hashed == []
    land(storage, lines=LINES[:1])  # rewritten: other bytes
    (again,) = event_store.stage_landing(storage)
    assert hashed == [source] and again["newly_staged"] and again["digest"] != first["digest"]


def test_an_overlapping_file_adds_only_new_events(storage):
    land(storage)
    land(storage, "later_2026-03-01_5#1.json.gz", [LINES[0], {**LINES[0], "insert_id": "z", "user_id": "u3"}])
    with dg.instance_for_test() as instance:
        result = materialise_hours(storage, instance)
    metadata = result.asset_materializations_for_node("events")[0].metadata
    assert metadata["new_events"].value == 3
    assert metadata["duplicates_dropped"].value == 1
    users = storage.read_table(*layout.events_hour(utc(2026, 3, 1, 5)), columns=["user_id"]).column("user_id").to_pylist()
    assert sorted(users) == ["u1", "u3"]


def test_direct_writes_merge_with_what_is_stored(storage):
    table = events_table([{"user_id": "u1", "event_type": "a", "event_time": utc(2026, 3, 1, 5, 1), "insert_id": "x"}])
    assert event_store.write_events(storage, table) == [utc(2026, 3, 1, 5)]
    event_store.write_events(storage, table)
    assert storage.read_table(*layout.events_hour(utc(2026, 3, 1, 5))).num_rows == 1


def test_an_hour_from_a_single_file_is_what_merging_would_write(storage, tmp_path):
    """A new hour that one file fills is that file's staged chunk, copied: it must equal the merged hour (deduplicated,
    sorted by event_time and insert_id, the store's schema) that the merge path writes."""
    from automl_assets.core.ingest import read_events
    from resources.storage import LocalStorage

    unsorted = [
        {"event_type": "view", "user_id": "u2", "event_time": "2026-03-01 05:40:00", "insert_id": "q", "event_properties": {"p": 1}},
        {"event_type": "buy", "user_id": "u1", "event_time": "2026-03-01 05:10:00", "insert_id": "r", "revenue": 3.5},
        {"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:10:00", "insert_id": "a"},
        {"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:10:00", "insert_id": "a"},
    ]
    source = land(storage, lines=unsorted)
    with dg.instance_for_test() as instance:
        assert materialise_hours(storage, instance).success
    copied = storage.read_table(*layout.events_hour(utc(2026, 3, 1, 5)))
    merged_store = LocalStorage(root=str(tmp_path / "merged"))
    event_store.write_events(merged_store, read_events(source).events)  # dedupe_events of the hour
    merged = merged_store.read_table(*layout.events_hour(utc(2026, 3, 1, 5)))
    assert copied.equals(merged) and copied.schema.equals(merged.schema)
    assert copied.column("insert_id").to_pylist() == ["a", "r", "q"]


def test_two_runs_merging_one_hour_at_once_keep_each_others_events(storage, monkeypatch):
    """The hourly schedule and the landing sensor can merge the same hour at once. The run that listed fewer files
    must not overwrite the other's merge with an older read of the hour."""
    hour = utc(2026, 3, 1, 5)
    first = land(storage, lines=[{"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:10:00", "insert_id": "a"}])
    event_store.merge_hours(storage, [hour], [event_store.stage_file(storage, first)])
    second = land(storage, "b_2026-03-01_5#0.json.gz", [{"event_type": "view", "user_id": "u2", "event_time": "2026-03-01 05:20:00", "insert_id": "b"}])
    third = land(storage, "c_2026-03-01_5#0.json.gz", [{"event_type": "view", "user_id": "u3", "event_time": "2026-03-01 05:30:00", "insert_id": "c"}])
    manifests = [event_store.stage_file(storage, path) for path in (first, second, third)]
    read_table = type(storage).read_table

    def slow_read(self, *parts, **kwargs):  # widens the window between reading the hour and writing it back
        table = read_table(self, *parts, **kwargs)
        time.sleep(0.3)
        return table

    monkeypatch.setattr(type(storage), "read_table", slow_read)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda listed: event_store.merge_hours(storage, [hour], listed), [manifests[:2], manifests[::2]]))
    assert sorted(storage.read_table(*layout.events_hour(hour))["insert_id"].to_pylist()) == ["a", "b", "c"]


def test_a_store_under_a_folder_named_with_a_quote_works_on_duckdb(tmp_path):
    import duckdb

    from automl_assets.core.engines import DuckDBEngine
    from automl_assets.core.timewin import hours_between
    from resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path / "it's a store"))
    start = utc(2026, 3, 1, 5)
    event_store.write_events(storage, events_table([{"user_id": "u1", "event_type": "view", "event_time": start.replace(minute=m)} for m in (1, 2)]))
    engine, hours = DuckDBEngine(duckdb.connect()), hours_between(start, start.replace(hour=7))
    engine.build_rollups(storage, hours)
    engine.register_rollups(storage, hours)
    assert engine.write("SELECT user_id, SUM(n) AS n FROM counts GROUP BY user_id", storage, ("out",)) == 1
    engine.register_parquet("out", storage.path("out"))
    assert engine.to_pandas("SELECT n FROM out")["n"].tolist() == [2]
