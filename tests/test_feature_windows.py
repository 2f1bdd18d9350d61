"""Window boundaries and leakage, through the same engines and SQL the assets run (each test on both engines)."""

import os
from datetime import timedelta

import pandas as pd
import pytest

from automl_assets.core.event_store import write_events
from automl_assets.core.feature_sql import (
    LONG_VALUE,
    EventProperty,
    Taxonomy,
    UserProperty,
    cohort_query,
    feature_query,
    label_query,
    matrix_query,
)
from automl_assets.core.timewin import epoch_hour, hours_between, partition_times
from tests.conftest import events_table, utc

MICRO = timedelta(microseconds=1)
HOUR_H = utc(2026, 3, 10, 11)
TIMES = partition_times(HOUR_H, horizon=timedelta(days=1), offset=timedelta(0), lookback=timedelta(weeks=2))
C, A = TIMES.train_cutoff, TIMES.as_of  # C = 2026-03-09 12:00, A = 2026-03-10 12:00


@pytest.fixture
def boundary_store(storage, engine):
    rows = [
        # just before the training cutoff: a training feature, never a label
        {"user_id": "before_c", "event_type": "purchase", "event_time": C - MICRO, "user_properties": {"plan": "free"}},
        # exactly at the cutoff: a label, never a training feature
        {"user_id": "at_c", "event_type": "purchase", "event_time": C, "user_properties": {"plan": "pro"}},
        {"user_id": "at_c", "event_type": "view", "event_time": C - timedelta(days=3), "user_properties": {"plan": "free"}},
        # the last microsecond before A: an inference feature and a label
        {"user_id": "before_a", "event_type": "purchase", "event_time": A - MICRO},
        # exactly at A: outside the partition altogether
        {"user_id": "at_a", "event_type": "purchase", "event_time": A},
        # 8 days before C: week 2 of the training features
        {"user_id": "before_c", "event_type": "view", "event_time": C - timedelta(days=8)},
    ]
    write_events(storage, events_table(rows))
    all_hours = hours_between(C - timedelta(weeks=3), A + timedelta(hours=2))
    engine.build_rollups(storage, all_hours)
    engine.register_rollups(storage, hours_between(TIMES.train_lookback_start, A))
    return storage


def features_as_of(engine, taxonomy, cutoff) -> pd.DataFrame:
    query = feature_query(taxonomy, epoch_hour(cutoff))
    return engine.to_pandas(query.sql).set_index("user_id")


def test_training_features_stop_one_microsecond_before_the_cutoff(boundary_store, engine):
    taxonomy = Taxonomy(events=("purchase", "view"), user_properties=(UserProperty("plan", ("free", "pro")),), weeks=2)
    train = features_as_of(engine, taxonomy, C)
    assert train.loc["before_c", "f__purchase__w1"] == 1  # C - 1us is inside [C - 7d, C)
    assert train.loc["before_c", "f__view__w2"] == 1  # C - 8d is inside [C - 14d, C - 7d)
    assert train.loc["before_c", "f__purchase__hours_since"] == 1
    # at_c's purchase at exactly C is not visible; only the earlier view is
    assert train.loc["at_c", "f__purchase__w1"] == 0
    assert train.loc["at_c", "f__view__w1"] == 1
    # the plan changed to "pro" at C: as of C, the last value seen is still "free"
    assert train.loc["at_c", "f__user__plan__free__last"] == 1
    assert train.loc["at_c", "f__user__plan__pro__last"] == 0
    assert "before_a" not in train.index and "at_a" not in train.index


def test_inference_features_see_up_to_but_not_including_a(boundary_store, engine):
    taxonomy = Taxonomy(events=("purchase",), weeks=2)
    infer = features_as_of(engine, taxonomy, A)
    assert infer.loc["before_a", "f__purchase__w1"] == 1
    assert infer.loc["at_c", "f__purchase__w1"] == 1
    assert "at_a" not in infer.index


def test_labels_cover_exactly_c_to_a(boundary_store, engine):
    engine.register_events(boundary_store, hours_between(TIMES.label_start, TIMES.label_end))
    labelled = engine.to_pandas(label_query("purchase", {}, sum_revenue=False)).set_index("user_id")["outcome"]
    assert labelled.to_dict() == {"at_c": 1, "before_a": 1}


def test_cohort_and_the_hourly_scoring_set(boundary_store, engine):
    infer = engine.to_pandas(cohort_query(epoch_hour(A), active_hours=24, lookback_weeks=2, where={}))
    by_user = infer.set_index("user_id")["active_last_hour"].to_dict()
    assert by_user == {"at_c": 0, "before_a": 1}  # active within [A - 24h, A); before_c's last event is at C - 1us
    train = engine.to_pandas(cohort_query(epoch_hour(C), active_hours=24, lookback_weeks=2, where={"plan": "free"}))
    assert sorted(train["user_id"]) == ["before_c"]
    hourly = engine.to_pandas(cohort_query(epoch_hour(A), 24, 2, {}, only_active_last_hour=True))
    assert hourly.set_index("user_id")["active_last_hour"].to_dict() == {"before_a": 1}


def test_a_cohort_user_with_no_event_in_the_lookback_has_the_never_values(storage, engine):
    """A cohort active within longer than the lookback: a user whose last event is before the lookback has no
    feature row, and the matrix gives them "hours since" = lookback + 1h, as for an event they never did, not 0,
    which would say they did it within the hour."""
    rows = [
        {"user_id": "recent", "event_type": "purchase", "event_time": A - timedelta(minutes=30)},
        {"user_id": "three_weeks_ago", "event_type": "purchase", "event_time": A - timedelta(days=21)},
    ]
    write_events(storage, events_table(rows))
    engine.register_rollups(storage, hours_between(A - timedelta(weeks=4), A))
    engine.register_query("cohort", cohort_query(epoch_hour(A), active_hours=28 * 24, lookback_weeks=2, where={}))
    query = feature_query(Taxonomy(events=("purchase",), weeks=2), epoch_hour(A), users="cohort")
    engine.register_query("features", query.sql)
    matrix = engine.to_pandas(matrix_query(query.columns, query.absent)).set_index("user_id")
    never = 2 * 168 + 1
    assert matrix.loc["three_weeks_ago", ["f__all__hours_since", "f__purchase__hours_since", "f__purchase__w1"]].tolist() == [never, never, 0]
    assert matrix.loc["recent", ["f__all__hours_since", "f__purchase__hours_since", "f__purchase__w1"]].tolist() == [1, 1, 1]


def test_long_property_values_and_quotes_mean_the_same_on_every_engine(storage, engine):
    """A property value longer than rollups keep is stored as LONG_VALUE (it still counts as a use of its property),
    and an event name or value with an apostrophe is counted as itself (a doubled quote in the SQL literal)."""
    rows = [
        {"user_id": "u", "event_type": "men's buy", "event_time": A - timedelta(minutes=30), "event_properties": {"note": "x" * 150, "size": "it's"}},
        {"user_id": "v", "event_type": "mens buy", "event_time": A - timedelta(minutes=20), "event_properties": {"size": "its"}},
    ]
    write_events(storage, events_table(rows))
    hours = hours_between(A - timedelta(days=1), A)
    engine.build_rollups(storage, hours)
    engine.register_rollups(storage, hours)
    props = engine.to_pandas("SELECT event_type, prop_key, prop_value, n FROM props ORDER BY event_type, prop_key")
    assert props.values.tolist() == [["men's buy", "note", LONG_VALUE, 1], ["men's buy", "size", "it's", 1], ["mens buy", "size", "its", 1]]
    query = feature_query(Taxonomy(events=("men's buy",), event_properties=(EventProperty("men's buy", "size", ("it's",)),), weeks=1), epoch_hour(A))
    features = engine.to_pandas(query.sql).set_index("user_id")
    event_week, size = query.columns[3], query.columns[-1]  # after all events' week, active hours and hours since
    assert event_week.endswith("__w1") and "__all__" not in event_week and "size" in size
    assert features.loc[["u", "v"], [event_week, size]].values.tolist() == [[1, 1], [0, 0]]


def test_both_engines_build_identical_rollups_and_features(tmp_path, spark_session):
    """One definition, two engines: DuckDB and Spark agree to the row on rollups, features, labels and cohorts."""
    from automl_assets.core.engines import DuckDBEngine, SparkEngine, remove_rollups
    from automl_assets.core.event_store import write_events
    from automl_assets.core.feature_sql import EventProperty
    from automl_assets.core.synthetic import SyntheticConfig, generate_table
    from resources.storage import LocalStorage

    end = utc(2026, 3, 2)
    hours = hours_between(end - timedelta(weeks=3), end)
    table = generate_table(SyntheticConfig(n_users=300, end=end, weeks=3, seed=5))
    taxonomy = Taxonomy(
        events=("page_view", "purchase", "view_item", "support_ticket"),
        revenue_events=("purchase",),
        event_properties=(EventProperty("view_item", "category", ("electronics", "books")),),
        user_properties=(UserProperty("plan", ("free", "plus", "pro")), UserProperty("platform", ("ios", "web"))),
        weeks=2,
    )
    results = {}
    for engine in (DuckDBEngine(__import__("duckdb").connect()), SparkEngine(spark_session)):
        store = LocalStorage(root=str(tmp_path / engine.name))
        write_events(store, table)
        engine.build_rollups(store, hours)
        rollups = {
            str(path.relative_to(store.base)): pd.read_parquet(path)
            for path in sorted([*store.base.glob("rollups/*/hour=*/*.parquet"), *store.base.glob("rollups_daily/*/day=*/*.parquet")])
        }
        engine.register_rollups(store, hours)
        engine.register_events(store, hours[-168:])
        engine.register_query("active", f"SELECT user_id FROM counts WHERE hour_idx = {epoch_hour(end) - 1}")
        results[engine.name] = (
            rollups,
            engine.to_pandas(feature_query(taxonomy, epoch_hour(end)).sql),
            engine.to_pandas(feature_query(taxonomy, epoch_hour(end), users="active").sql),
            engine.to_pandas(label_query("purchase", {"category": "electronics"}, sum_revenue=False)),
            engine.to_pandas(cohort_query(epoch_hour(end), 24 * 14, 2, {"plan": "pro"})),
        )
        for where in ({}, {"plan": "free"}):  # the hourly cohort read from the last hour only is the same set
            hourly = engine.to_pandas(cohort_query(epoch_hour(end), 24 * 14, 2, where, only_active_last_hour=True))
            cohort = engine.to_pandas(cohort_query(epoch_hour(end), 24 * 14, 2, where))
            assert 0 < len(hourly) < len(cohort)
            pd.testing.assert_frame_equal(
                hourly.sort_values("user_id").reset_index(drop=True),
                cohort[cohort["active_last_hour"] == 1].sort_values("user_id").reset_index(drop=True),
            )
        # A cold start: hours not rolled up yet are computed from their events by the same rollup definitions.
        remove_rollups(store, hours[::3])
        engine.register_rollups(store, hours)
        by_user = lambda frame: frame.sort_values("user_id").reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(
            by_user(engine.to_pandas(feature_query(taxonomy, epoch_hour(end)).sql)), by_user(results[engine.name][1])
        )
    duck, spark = results["duckdb"], results["spark"]
    assert duck[0].keys() == spark[0].keys() and len(duck[0]) == 3 * 21  # 3 kinds x 21 whole days
    sort = lambda frame: frame.sort_values(list(frame.columns[:4])).reset_index(drop=True)  # noqa: E731
    for name in duck[0]:
        pd.testing.assert_frame_equal(sort(duck[0][name]), sort(spark[0][name]), check_dtype=False, obj=name)
    for d, s in zip(duck[1:], spark[1:]):
        assert len(d) > 0
        pd.testing.assert_frame_equal(
            d.sort_values("user_id").reset_index(drop=True), s.sort_values("user_id").reset_index(drop=True)[d.columns], check_dtype=False
        )


def test_whole_days_are_stored_as_day_files_that_follow_every_rebuild(storage, engine):
    """A UTC day rolled up whole is stored as one file per kind, which the views read (and cut to their hours)
    instead of 24 hourly files; a day built in parts gets its file from the hourly files once it is over and every
    hour with events has rollups; a rebuilt hour is rewritten inside its day's file. Features equal the
    ones computed from the events alone throughout."""
    from automl_assets.core import layout
    from automl_assets.core.engines import remove_replaced_hours, remove_rollups
    from automl_assets.core.spark_jobs import existing_hour_paths, rollup_paths
    from automl_assets.core.synthetic import SyntheticConfig, generate_table

    end = utc(2026, 3, 2)
    hours = hours_between(end - timedelta(days=3), end)
    day1, day2, day3 = (end - timedelta(days=d) for d in (3, 2, 1))
    write_events(storage, generate_table(SyntheticConfig(n_users=150, end=end, weeks=1, seed=3)))
    extra = [{"user_id": "early", "event_type": "purchase", "event_time": day1 + timedelta(hours=h, minutes=1)} for h in (2, 3)]
    write_events(storage, events_table(extra))
    taxonomy = Taxonomy(events=("page_view", "purchase"), user_properties=(UserProperty("plan", ("free", "pro")),), weeks=1)
    days = lambda: storage.list_dir(*layout.rollup_days_root("counts"))  # noqa: E731
    day_names = lambda *ds: [f"day={d:%Y-%m-%d}" for d in ds]  # noqa: E731

    def features(view_hours=hours) -> pd.DataFrame:
        engine.register_rollups(storage, view_hours)
        return features_as_of(engine, taxonomy, view_hours[-1] + timedelta(hours=1)).sort_index()

    def from_events(view_hours=hours) -> pd.DataFrame:
        """The same features with the rollups moved aside: the views compute them from the events."""
        aside = storage.base / "aside"
        aside.mkdir()
        for root in ("rollups", "rollups_daily"):
            (storage.base / root).rename(aside / root)
        try:
            return features(view_hours)
        finally:
            for root in ("rollups", "rollups_daily"):
                (aside / root).rename(storage.base / root)
            aside.rmdir()

    # Day 1 from its 4th hour, hour 2 never rolled up: the day ends within the build but keeps its hourly files.
    engine.build_rollups(storage, hours[:2])
    engine.build_rollups(storage, hours[3:])
    assert days() == day_names(day2, day3)
    assert not existing_hour_paths(storage, layout.rollup_root("counts"), hours[24:], ("part-0.parquet",))
    pd.testing.assert_frame_equal(features(), from_events())
    # Its missing hour rolled up, later days stored: the day is over and whole, and its file is made from its hours.
    engine.build_rollups(storage, [hours[2]])
    assert days() == day_names(day1, day2, day3)
    for kind in layout.ROLLUP_KINDS:
        hour_files = existing_hour_paths(storage, layout.rollup_root(kind), hours[:24], ("part-0.parquet",))
        pd.testing.assert_frame_equal(
            pd.read_parquet(storage.path(*layout.rollup_day(kind, day1), "part-0.parquet")),
            pd.concat(pd.read_parquet(path) for path in hour_files).reset_index(drop=True),
            obj=kind,
        )
    assert len(rollup_paths(storage, "counts", hours)) == 3
    with_days = features()
    pd.testing.assert_frame_equal(with_days, from_events())
    # A view that starts or ends inside a day reads that day's file and keeps only its own hours.
    pd.testing.assert_frame_equal(features(hours[3:50]), from_events(hours[3:50]))

    # Late events in day 2: their hour's rollups are rewritten inside the day's file.
    late = events_table([{"user_id": "late", "event_type": "purchase", "event_time": day2 + timedelta(hours=7, minutes=5),
                          "user_properties": {"plan": "pro"}}])
    write_events(storage, late)
    engine.build_rollups(storage, [day2 + timedelta(hours=7)])
    assert days() == day_names(day1, day2, day3)
    with_late = features()
    assert with_late.loc["late", "f__purchase__w1"] == 1
    pd.testing.assert_frame_equal(with_late.drop(index="late"), with_days)
    pd.testing.assert_frame_equal(with_late, from_events())

    # Forgetting hours of a stored day puts its other hours back in hourly files; the forgotten ones come from events.
    remove_rollups(storage, hours[30:40])
    assert days() == day_names(day1, day3)
    pd.testing.assert_frame_equal(features(), with_late)
    # An hour whose counts file is gone counts as not rolled up: its other kinds' files are not read beside its events.
    hour = next(h for h in hours[40:48] if storage.exists(*layout.rollup_hour("users", h)))
    users_rows = len(pd.read_parquet(storage.path(*layout.rollup_hour("users", hour), "part-0.parquet")))
    storage.remove(*layout.rollup_hour("counts", hour))
    pd.testing.assert_frame_equal(features(), with_late)
    assert engine.to_pandas(f"SELECT COUNT(*) AS n FROM users WHERE hour_idx = {epoch_hour(hour)}")["n"][0] == users_rows

    # Day 3 rebuilt in two parts gets its file from its hours, which stay until its file is a day old, like day 1's.
    remove_rollups(storage, hours[48:])
    engine.build_rollups(storage, hours[48:60])
    engine.build_rollups(storage, hours[60:])
    assert days() == day_names(day1, day3)
    hour_files = lambda kind, day_hours: existing_hour_paths(storage, layout.rollup_root(kind), day_hours, ("part-0.parquet",))  # noqa: E731
    assert hour_files("counts", hours[:24]) and hour_files("counts", hours[48:])
    day_old = (end - timedelta(days=1, minutes=1)).timestamp()
    os.utime(storage.path(*layout.rollup_day("counts", day1), "part-0.parquet"), (day_old, day_old))
    remove_replaced_hours(storage, end)
    assert not hour_files("counts", hours[:24]) and hour_files("users", hours[:24]) and hour_files("counts", hours[48:])
    pd.testing.assert_frame_equal(features(), with_late)
