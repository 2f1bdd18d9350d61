import gzip
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from automl_assets.core.schema import EVENT_SCHEMA
from automl_assets.core.synthetic import (
    EVENT_TYPES,
    SyntheticConfig,
    _Events,
    _time_order,
    generate_events,
    generate_table,
    write_amplitude_export,
)

END = datetime(2026, 3, 1, tzinfo=timezone.utc)
WEEK = pd.Timedelta(days=7)


@pytest.fixture(scope="module")
def config() -> SyntheticConfig:
    return SyntheticConfig(n_users=2_000, end=END, weeks=8, seed=7)


@pytest.fixture(scope="module")
def table(config) -> pa.Table:
    return generate_table(config)


@pytest.fixture(scope="module")
def events(table) -> pd.DataFrame:
    frame = table.select(["user_id", "event_type", "event_time"]).to_pandas()
    frame["category"] = pc.map_lookup(table["event_properties"], "category", "first").to_pandas()
    frame["plan"] = pc.map_lookup(table["user_properties"], "plan", "first").to_pandas()
    return frame


def test_schema_and_vocabulary(table):
    assert table.schema == EVENT_SCHEMA
    assert set(pc.unique(table["event_type"]).to_pylist()) == set(EVENT_TYPES)
    assert table.num_rows > 50_000


def test_same_seed_same_table_other_seed_differs(config, table):
    assert generate_table(config).equals(table)
    other = generate_table(SyntheticConfig(n_users=config.n_users, end=END, weeks=config.weeks, seed=8))
    assert not other.equals(table)


def test_output_does_not_depend_on_chunking_or_threads():
    config = SyntheticConfig(n_users=40_000, end=END, weeks=1, seed=3, events_per_user_per_week=0.5)
    whole = pa.concat_tables(generate_events(config))
    chunks = list(generate_events(config, chunk_users=7_000, threads=1))
    assert len(chunks) == 6
    assert pa.concat_tables(chunks).equals(whole)


def test_times_within_window_and_table_is_the_sorted_stream(config, table):
    times = table["event_time"]
    assert pc.min(times).as_py() >= config.end - timedelta(weeks=config.weeks)
    assert pc.max(times).as_py() < config.end
    stream = pa.concat_tables(generate_events(config, chunk_users=500))
    assert table.equals(stream.sort_by([("event_time", "ascending"), ("insert_id", "ascending")]))


def test_time_ties_follow_insert_id_text_order():
    # Same user, same microsecond: insert_id "...-10" sorts before "...-9" as text.
    events = _Events(
        user=np.array([1, 1, 1, 0], np.int32),
        etype=np.zeros(4, np.int8),
        time=np.array([5, 7, 7, 7]),
        sequence=np.array([8, 9, 10, 3], np.int32),
        prop_keys=np.zeros((4, 1), np.int8),
        prop_values=np.zeros((4, 1), np.int16),
        user_props=np.zeros((4, 3), np.int16),
        revenue=np.full(4, np.nan),
    )
    assert _time_order(events).tolist() == [0, 3, 2, 1]


def test_identifiers(table, config):
    assert pc.count_distinct(table["insert_id"]).as_py() == table.num_rows
    assert pc.all(pc.match_substring_regex(table["user_id"], r"^u\d{6}$")).as_py()
    assert pc.all(pc.starts_with(table["insert_id"], f"{config.seed}-u")).as_py()


def test_activity_is_heavy_tailed(events):
    per_user = events["user_id"].value_counts()
    top = per_user.iloc[: len(per_user) // 100].sum()
    assert top / len(events) > 0.08


def test_users_join_over_time(events):
    first_seen = events.groupby("user_id")["event_time"].min()
    start = events["event_time"].min()
    assert (first_seen > start + 4 * WEEK).mean() > 0.15


def test_user_and_event_properties(table, events):
    user_properties = table["user_properties"].combine_chunks()
    assert set(pc.unique(user_properties.keys).to_pylist()) == {"platform", "country", "plan"}
    assert (np.diff(user_properties.offsets.to_numpy()) == 3).all()
    plans = events.groupby("user_id")["plan"].agg(["first", "last"])
    assert 0 < (plans["first"] != plans["last"]).sum() < 0.2 * len(plans)
    item_ids = pc.map_lookup(table["event_properties"], "item_id", "first")
    assert pc.count_distinct(item_ids).as_py() > 1_000
    purchases = table.filter(pc.equal(table["event_type"], "purchase"))
    assert pc.all(pc.greater(purchases["revenue"], 0)).as_py()
    assert table["revenue"].null_count == table.num_rows - purchases.num_rows
    pages = pc.map_lookup(table.filter(pc.equal(table["event_type"], "page_view"))["event_properties"], "page", "first")
    assert pages.null_count == 0
    # Keys in name order: the canonical order ingestion writes.
    sample = table.slice(0, 20_000)
    for maps in (sample["event_properties"].to_pylist(), sample["user_properties"].to_pylist()):
        assert all([k for k, _ in m] == sorted(k for k, _ in m) for m in maps)


def _window_counts(events: pd.DataFrame, start, end, prefix: str) -> pd.DataFrame:
    window = events[(events["event_time"] >= start) & (events["event_time"] < end)]
    counts = window.groupby(["user_id", "event_type"]).size().unstack(fill_value=0)
    counts["electronics_views"] = (
        window[(window["event_type"] == "view_item") & (window["category"] == "electronics")].groupby("user_id").size()
    )
    return counts.fillna(0).add_prefix(prefix)


def _dataset(events: pd.DataFrame, cutoff, outcome: str) -> tuple[pd.DataFrame, pd.Series]:
    """Counts in the two weeks before ``cutoff`` for users active in the 28 days before it; label = outcome within
    the 7 days after it."""
    before = events[events["event_time"] < cutoff]
    cancelled = set(before.loc[before["event_type"] == "subscription_cancelled", "user_id"])
    active = set(before.loc[before["event_time"] >= cutoff - 4 * WEEK, "user_id"]) - cancelled
    features = (
        _window_counts(events, cutoff - WEEK, cutoff, "w1_")
        .join(_window_counts(events, cutoff - 2 * WEEK, cutoff - WEEK, "w2_"), how="outer")
        .reindex(sorted(active))
        .fillna(0)
    )
    last = before.groupby("user_id").agg(last_time=("event_time", "max"), plan=("plan", "last"))
    features["days_since_last"] = (cutoff - last["last_time"]).dt.total_seconds() / 86_400
    features["pro"] = last["plan"] == "pro"
    after = events[(events["event_time"] >= cutoff) & (events["event_time"] < cutoff + WEEK)]
    label = features.index.isin(after.loc[after["event_type"] == outcome, "user_id"])
    return features, pd.Series(label, index=features.index)


PURCHASE_FEATURES = ["view_item", "add_to_cart", "begin_checkout", "purchase", "session_start", "electronics_views"]
CHURN_FEATURES = ["session_start", "support_ticket", "page_view"]


@pytest.mark.parametrize(
    ("outcome", "counted", "rate_range"),
    [("purchase", PURCHASE_FEATURES, (0.10, 0.25)), ("subscription_cancelled", CHURN_FEATURES, (0.03, 0.10))],
)
def test_planted_signal_is_learnable_out_of_time(events, outcome, counted, rate_range):
    end = pd.Timestamp(END)
    train_x, train_y = _dataset(events, end - 2 * WEEK, outcome)
    test_x, test_y = _dataset(events, end - WEEK, outcome)
    columns = [f"{w}{c}" for w in ("w1_", "w2_") for c in counted if f"{w}{c}" in train_x] + ["days_since_last", "pro"]

    def design(frame: pd.DataFrame) -> np.ndarray:
        return np.log1p(frame.reindex(columns=columns, fill_value=0).to_numpy(dtype=float))

    assert rate_range[0] < test_y.mean() < rate_range[1]
    model = LogisticRegression(max_iter=1_000).fit(design(train_x), train_y)
    auc = roc_auc_score(test_y, model.predict_proba(design(test_x))[:, 1])
    assert auc > 0.7, auc


def test_cancelled_users_go_quiet(events):
    cancelled_at = events[events["event_type"] == "subscription_cancelled"].groupby("user_id")["event_time"].min()
    assert len(cancelled_at) > 0
    last_event = events.groupby("user_id")["event_time"].max()
    assert (last_event[cancelled_at.index] == cancelled_at).all()


def test_amplitude_export_round_trips(table, tmp_path):
    part = table.slice(0, 5_000)
    paths = write_amplitude_export(part, tmp_path)
    records = {path.name: [json.loads(line) for line in gzip.open(path, "rt")] for path in paths}
    assert sum(map(len, records.values())) == part.num_rows
    assert sorted(r["insert_id"] for rs in records.values() for r in rs) == sorted(part["insert_id"].to_pylist())

    row = part.filter(pc.equal(part["event_type"], "purchase")).slice(0, 1).to_pylist()[0]
    time = row["event_time"]
    hour_file = records[f"synthetic_{time:%Y-%m-%d}_{time.hour}#0.json.gz"]
    assert {
        "event_type": "purchase",
        "user_id": row["user_id"],
        "device_id": None,
        "event_time": time.strftime("%Y-%m-%d %H:%M:%S.%f"),
        "event_properties": dict(row["event_properties"]),
        "user_properties": dict(row["user_properties"]),
        "insert_id": row["insert_id"],
        "revenue": row["revenue"],
    } in hour_file
    assert all("revenue" not in r for rs in records.values() for r in rs if r["event_type"] != "purchase")
    lines = [line for path in paths for line in gzip.open(path, "rt")]
    assert all(line == json.dumps(json.loads(line), separators=(",", ":"), ensure_ascii=False) + "\n" for line in lines)


def test_export_escapes_like_json_dumps(tmp_path):
    awkward = {"q": 'say "hi"', "b": "C:\\temp", "nl": "a\nb\tc", "u": "café ☕", "none": None}
    table = pa.Table.from_pylist(
        [
            {"user_id": 'u"1', "event_type": "a\\b", "event_time": END - timedelta(microseconds=1), "insert_id": "x1",
             "event_properties": list(awkward.items()), "user_properties": None, "revenue": 100.0},
            {"user_id": "u2", "event_type": "plain", "event_time": END - timedelta(hours=5), "insert_id": "x2",
             "event_properties": [("k", 'v"\\é')], "user_properties": None, "revenue": None},
        ],
        schema=EVENT_SCHEMA,
    )
    paths = write_amplitude_export(table, tmp_path)
    assert [p.name for p in paths] == ["synthetic_2026-02-28_19#0.json.gz", "synthetic_2026-02-28_23#0.json.gz"]
    last = json.loads(gzip.open(paths[1], "rt").read())
    assert last["user_id"] == 'u"1' and last["event_type"] == "a\\b" and last["revenue"] == 100.0
    assert last["event_properties"] == awkward and last["user_properties"] == {}
    assert last["event_time"] == "2026-02-28 23:59:59.999999"
    assert gzip.open(paths[0], "rt").read() == (
        '{"event_type":"plain","user_id":"u2","device_id":null,"event_time":"2026-02-28 19:00:00.000000",'
        '"event_properties":{"k":"v\\"\\\\é"},"user_properties":{},"insert_id":"x2"}\n'
    )


def test_export_appends_parts_instead_of_overwriting(table, tmp_path):
    first, second = table.slice(0, 300), table.slice(300, 300)
    paths = write_amplitude_export(first, tmp_path) + write_amplitude_export(second, tmp_path)
    assert len(set(paths)) == len(paths)
    assert any(p.name.endswith("#1.json.gz") for p in paths)
    records = [json.loads(line) for path in tmp_path.iterdir() for line in gzip.open(path, "rt")]
    assert sorted(r["insert_id"] for r in records) == sorted(table.slice(0, 600)["insert_id"].to_pylist())


def test_export_is_byte_reproducible(table, tmp_path):
    part = table.slice(0, 2_000)
    first = write_amplitude_export(part, tmp_path / "a")
    second = write_amplitude_export(part, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_config_requires_aware_end():
    with pytest.raises(ValueError):
        SyntheticConfig(end=datetime(2026, 3, 1))
