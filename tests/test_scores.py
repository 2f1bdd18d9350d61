"""The latest-score table: each user's most recent score, whatever order the hours are (re-)run in."""

import concurrent.futures

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from automl_assets.core import layout
from automl_assets.scores import merge_latest


def scores_at(hour: int, users: list[str], score: float, prediction: str = "p") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": users,
            "prediction": prediction,
            "score": score,
            "percentile": 50.0,
            "model_version": "p@v",
            "scored_at": pd.Timestamp("2026-03-01", tz="UTC") + pd.Timedelta(hours=hour),
        }
    )


def latest(storage) -> dict[str, tuple[int, float]]:
    table = storage.read_table(*layout.latest_scores("p")).to_pandas()
    assert table["user_id"].is_unique
    return {row.user_id: (row.scored_at.hour, row.score) for row in table.itertuples()}


def test_latest_scores_keep_each_users_most_recent_score(storage):
    assert merge_latest(storage, "p", scores_at(0, ["c", "a", "b"], 0.1)) == 3  # the daily run: everyone
    assert merge_latest(storage, "p", scores_at(5, ["b", "d"], 0.2)) == 4  # an hour later: active users, one new
    assert latest(storage) == {"a": (0, 0.1), "b": (5, 0.2), "c": (0, 0.1), "d": (5, 0.2)}
    merge_latest(storage, "p", scores_at(3, ["a", "b"], 0.3))  # a backfill of an older hour
    assert latest(storage) == {"a": (3, 0.3), "b": (5, 0.2), "c": (0, 0.1), "d": (5, 0.2)}
    merge_latest(storage, "p", scores_at(5, ["d"], 0.4))  # a re-run of the same hour replaces its own rows
    assert latest(storage) == {"a": (3, 0.3), "b": (5, 0.2), "c": (0, 0.1), "d": (5, 0.4)}


def test_runs_merging_at_the_same_time_keep_every_update(storage):
    def hourly_run(run: int) -> None:
        for hour in range(8):
            merge_latest(storage, "p", scores_at(hour, [f"run{run}-user{hour}"], 0.5))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(hourly_run, range(4)))
    assert len(latest(storage)) == 4 * 8


def test_the_latest_score_folder_reads_as_one_table_with_any_parquet_reader(storage):
    merge_latest(storage, "p", scores_at(0, ["a", "b"], 0.1))
    merge_latest(storage, "churn_28d", scores_at(0, ["a"], 0.7, prediction="churn_28d"))
    folder = storage.path("scores_latest")
    expected = [("a", "churn_28d", 0.7), ("a", "p", 0.1), ("b", "p", 0.1)]
    frame = pd.read_parquet(folder)
    assert sorted(zip(frame["user_id"], frame["prediction"].astype(str), frame["score"])) == expected
    assert pq.read_table(folder).num_rows == 3
    rows = duckdb.sql(f"SELECT user_id, prediction, score FROM read_parquet('{folder}/*/*.parquet', hive_partitioning = true)").fetchall()
    assert sorted(rows) == expected
