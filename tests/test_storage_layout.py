"""Exact paths of the store: they are an interface (Spark, DuckDB and people read the lake directly)."""

import pyarrow as pa

from automl_assets.core import layout
from tests.conftest import utc

HOUR = utc(2026, 3, 1, 5)


def test_exact_paths(storage):
    root = storage.base
    assert storage.path(*layout.events_hour(HOUR)) == str(root / "events/hour=2026-03-01T05/events.parquet")
    assert storage.path(*layout.rollup_hour("counts", HOUR), "part-0.parquet") == str(
        root / "rollups/counts/hour=2026-03-01T05/part-0.parquet"
    )
    assert storage.path(*layout.rollup_day("props", HOUR), "part-0.parquet") == str(
        root / "rollups_daily/props/day=2026-03-01/part-0.parquet"
    )
    assert storage.path(*layout.staged_hour("abc", HOUR)) == str(root / "staging/abc/hour=2026-03-01T05.parquet")
    assert storage.path(*layout.staged_manifest("abc")) == str(root / "staging/abc/manifest.json")
    assert storage.path(*layout.landing_index("abc")) == str(root / "staging_index/abc.json")
    assert layout.hour_folder(HOUR) == "hour=2026-03-01T05" and layout.folder_hour("hour=2026-03-01T05") == HOUR
    assert storage.path(*layout.hourly_rollups_root()) == str(root / "rollups")
    assert storage.path(*layout.daily_rollups_root()) == str(root / "rollups_daily")
    assert storage.path(*layout.prediction_asset("buy_7d", "scores", HOUR, "scores.parquet")) == str(
        root / "predictions/buy_7d/scores/hour=2026-03-01T05/scores.parquet"
    )
    assert storage.path(*layout.latest_scores("buy_7d")) == str(root / "scores_latest/prediction=buy_7d/latest.parquet")
    assert storage.path(*layout.spec_file("buy_7d")) == str(root / "specs/buy_7d.yaml")
    assert ":" not in storage.path(*layout.events_hour(HOUR)).split(str(root))[1]


def test_writes_are_atomic_and_leave_no_temp_files(storage):
    table = pa.table({"a": [1, 2]})
    storage.write_table(table, "x", "t.parquet")
    storage.write_table(pa.table({"a": [3]}), "x", "t.parquet")
    assert storage.read_table("x", "t.parquet").column("a").to_pylist() == [3]
    assert storage.list_dir("x") == ["t.parquet"]
    with storage.temp_dir() as temp:
        (temp / "folder").mkdir()
        (temp / "folder" / "f").write_text("new")
        storage.install(temp / "folder", "y")
    assert (storage.base / "y" / "f").read_text() == "new"
    assert storage.list_dir(".tmp") == []


def test_reading_a_missing_object_says_what_to_do(storage):
    import pytest

    with pytest.raises(FileNotFoundError, match="materialise the asset that writes it"):
        storage.read_table("nothing.parquet")
