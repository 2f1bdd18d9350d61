"""Out-of-time backtest of a prediction spec on a canonical events file, through the asset graph itself.

For a cutoff T the events are loaded into a temporary store and the assets are materialised in a temporary Dagster
instance for the partition whose as-of time is T (hour H = T - 1h), as a scheduled run would: the model trains on
labels that end at T (features as of T - offset - horizon) and the whole cohort is scored as of T. The scores are
then compared with what the users did in [T + offset, T + offset + horizon), counted by the labels asset's query
over the same events. Beside them, on the same users and windows: a logistic regression on recency / frequency /
monetary features and a constant at the training positive rate.

Hour partitions start at partitions.FIRST_HOUR, so events older than that (public data sets often are) are moved
forward, cutoff included, by the fewest whole weeks that bring every hour the partition reads into range: weekday
and hour of day are unchanged, and the result says how far they moved.
"""

import csv
import gzip
import json
import math
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from automl_assets.core import event_store, layout
from automl_assets.core.feature_sql import label_query
from automl_assets.core.ingest import ColumnMapping, detect_format, read_events
from automl_assets.core.metrics import auc_difference, summarise
from automl_assets.core.spec import Outcome, PredictionSpec
from automl_assets.core.timewin import (
    HOUR,
    WEEK,
    PartitionTimes,
    floor_hour,
    hour_from_key,
    hour_key,
    hours_between,
    partition_times,
    utc,
)
from automl_assets.core.training import signed_log1p
from automl_assets.definitions import ASSET_MODULES
from automl_assets.partitions import FIRST_HOUR, prediction_hour_key
from automl_assets.predictions import SCOPE_TAG, register_prediction
from automl_assets.runs import QUIET, RANGE_END_TAG, RANGE_START_TAG, raise_on_failure
from jobs import event_store_job, prediction_job
from resources.environments import resources_for_env
from resources.storage import LocalStorage

OPTIONAL_COLUMNS = ("insert_id", "event_properties", "user_properties", "revenue")
METRICS = ("auc", "log_loss", "brier", "ece")
# How far the data may fall short of the windows an evaluation reads: files rarely start or end on the hour.
COVERAGE_SLACK = timedelta(days=1)
RFM_COLUMNS = ("recency_days", "frequency", "monetary")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _column_names(path: Path, fmt: str) -> set[str]:
    try:
        if fmt == "parquet":
            return set(pq.read_schema(path).names)
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            return set(next(csv.reader(handle), []))
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException):
        return set()  # read_events reports what is wrong with the file


def load_events(path: str | Path, log: Callable[[str], None] = _stderr) -> pa.Table:
    """Canonical events of a file: CSV or parquet with the canonical column names (the optional ones are used when
    present; property columns may hold JSON text), or an Amplitude / Segment export."""
    path = Path(path)
    fmt = detect_format(path)
    mapping = None
    if fmt in ("csv", "parquet"):
        columns = _column_names(path, fmt)
        mapping = ColumnMapping(**{name: name for name in OPTIONAL_COLUMNS if name in columns})
    result = read_events(path, fmt, mapping)
    quarantined = result.reason_counts()
    log(f"read {result.events.num_rows:,} events from {path}; quarantined {quarantined or 'none'}")
    if result.events.num_rows == 0:
        raise ValueError(f"{path} holds no valid event; see the quarantine reasons above and fix the file.")
    return result.events


def week_shift(earliest: datetime) -> timedelta:
    """The fewest whole weeks that move `earliest` to or after the first hour partition (none when it already is)."""
    behind = hour_from_key(FIRST_HOUR) - earliest
    return WEEK * max(0, math.ceil(behind / WEEK))


def backtest_times(spec: PredictionSpec, cutoff: datetime) -> tuple[PartitionTimes, datetime, datetime]:
    """The partition as of `cutoff`, the first moment its newest training snapshot reads (the cohort's and the
    features' lookback before the training cutoff: the data must reach back to it) and the first moment the oldest
    snapshot the spec allows would read (data from before it is never used)."""
    times = partition_times(cutoff - HOUR, spec.horizon_delta, spec.offset_delta, spec.lookback)
    needed = times.train_cutoff - max(spec.active_within_delta, spec.lookback)
    return times, needed, needed - (spec.training_snapshots - 1) * WEEK


def outcome_events(events: pa.Table, outcome: Outcome) -> pd.DataFrame:
    """user_id, event_time, revenue of the events that make a user positive."""
    keep = pc.equal(events["event_type"], outcome.event)
    for key, value in outcome.where.items():
        keep = pc.and_kleene(keep, pc.equal(pc.map_lookup(events["event_properties"], key, "last"), value))
    return events.filter(pc.fill_null(keep, False)).select(["user_id", "event_time", "revenue"]).to_pandas()


def rfm_features(outcomes: pd.DataFrame, users, cutoff: datetime, since: datetime) -> pd.DataFrame:
    """Per user of `users`, from the outcome events in [since, cutoff): days since the last one, how many distinct
    times they happened (a basket of many lines is one), their revenue. A user without any is (window + 1 day, 0, 0)."""
    window = outcomes[(outcomes["event_time"] >= pd.Timestamp(since)) & (outcomes["event_time"] < pd.Timestamp(cutoff))]
    per_user = window.groupby("user_id").agg(
        last=("event_time", "max"), frequency=("event_time", "nunique"), monetary=("revenue", "sum")
    )
    per_user["recency_days"] = (pd.Timestamp(cutoff) - per_user["last"]) / pd.Timedelta(days=1)
    never = (cutoff - since) / timedelta(days=1) + 1
    features = per_user.reindex(pd.Index(users, name="user_id"))[list(RFM_COLUMNS)]
    return features.fillna({"recency_days": never, "frequency": 0, "monetary": 0}).astype(float)


def rfm_baseline(
    outcomes: pd.DataFrame,
    train: pd.DataFrame,
    train_cutoff: datetime,
    test_users,
    test_cutoff: datetime,
    lookback: timedelta,
) -> np.ndarray:
    """A plain logistic regression on RFM features of the project's training rows (each snapshot's users as of its
    cutoff, `train_cutoff` minus `snapshot` weeks, with their labels), applied to the test users' RFM features as of
    the test cutoff."""
    model = make_pipeline(FunctionTransformer(signed_log1p), StandardScaler(), LogisticRegression(max_iter=1000))
    snapshots = [(train_cutoff - weeks * WEEK, rows) for weeks, rows in train.groupby("snapshot", sort=True)]
    features = pd.concat(rfm_features(outcomes, rows["user_id"], cutoff, cutoff - lookback) for cutoff, rows in snapshots)
    model.fit(features, pd.concat(rows["label"] for _, rows in snapshots))
    return model.predict_proba(rfm_features(outcomes, test_users, test_cutoff, test_cutoff - lookback))[:, 1]


def _report(y: np.ndarray, p: np.ndarray, n_train: int, **extra) -> dict:
    metrics = summarise(y, p)
    return {
        **{name: metrics[name] for name in METRICS},
        "n_train": n_train,
        "n_test": metrics["n"],
        "pos_rate": metrics["positives"] / metrics["n"],
        **extra,
    }


def _materialise(resources: dict, instance, spec: PredictionSpec, times: PartitionTimes, earliest: datetime) -> None:
    """The event store over [earliest, A) in one range run, then the prediction chain for the partition."""
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    tags = {RANGE_START_TAG: hour_key(earliest), RANGE_END_TAG: hour_key(times.hour_start)}
    result = dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        selection=event_store_job.selection,
        run_config=QUIET,
        tags=tags,
        raise_on_error=False,
    )
    raise_on_failure(result, f"event store run for [{earliest.isoformat()}, {times.as_of.isoformat()})")
    register_prediction(instance, resources["storage"], spec)
    result = dg.materialize(
        assets,
        instance=instance,
        resources=resources,
        selection=prediction_job.selection,
        partition_key=prediction_hour_key(spec.name, times.hour_start),
        run_config=QUIET,
        tags={SCOPE_TAG: "cohort"},
        raise_on_error=False,
    )
    raise_on_failure(result, f"prediction run for {spec.name} at {hour_key(times.hour_start)}")


def _observed(resources: dict, outcome: Outcome, window: tuple[datetime, datetime]) -> set[str]:
    """Users with the outcome in `window`, by the labels asset's query on the same engine over the same hour files."""
    sql = resources["engine"].engine()
    sql.register_events(resources["storage"], hours_between(*window))
    labels = sql.to_pandas(label_query(outcome.event, outcome.where, sum_revenue=False))
    return set(labels.loc[labels["outcome"] > 0, "user_id"])


def place_in_partitions(
    events: pa.Table, spec: PredictionSpec, cutoff: datetime, log: Callable[[str], None]
) -> tuple[pa.Table, PartitionTimes, datetime, timedelta]:
    """The events an evaluation at `cutoff` reads, moved by whole weeks into the partitions' range when they are
    older; returns them, the partition's times and first hour read (both moved) and the shift."""
    times, needed, wanted = backtest_times(spec, cutoff)
    span = pc.min_max(events["event_time"])
    first, last = span["min"].as_py(), span["max"].as_py()
    if first > needed + COVERAGE_SLACK:
        raise ValueError(
            f"the events start at {first.isoformat()}, but training at cutoff {cutoff.isoformat()} reads from "
            f"{needed.isoformat()} (horizon, offset and the longer of lookback_weeks and cohort.active_within "
            "before it): pick a later cutoff or a shorter lookback."
        )
    test_end = times.predicts[1]
    if last < test_end - COVERAGE_SLACK:
        raise ValueError(
            f"the events end at {last.isoformat()}, before the end of the test window at {test_end.isoformat()}: "
            "pick a cutoff at least offset + horizon before the end of the data."
        )
    # Older training snapshots are stacked while the data reach back far enough for them (cohort.candidate_snapshots).
    earliest = max(wanted, floor_hour(first))
    shift = week_shift(earliest)
    if shift:
        log(
            f"hour partitions start at {FIRST_HOUR}: moving every event and the cutoff forward by {shift // WEEK} "
            f"weeks ({shift.days} days; weekday and hour of day unchanged)"
        )
        moved = pc.add(events["event_time"], pa.scalar(shift, pa.duration("us")))
        events = events.set_column(events.schema.get_field_index("event_time"), "event_time", moved)
    times, earliest = backtest_times(spec, cutoff + shift)[0], earliest + shift
    if times.as_of > datetime.now(times.as_of.tzinfo):
        raise ValueError(f"the cutoff {cutoff.isoformat()} is in the future; hour partitions exist up to now.")
    end = pa.scalar(times.predicts[1])
    kept = pc.and_(pc.greater_equal(events["event_time"], pa.scalar(earliest)), pc.less(events["event_time"], end))
    return events.filter(kept), times, earliest, shift


def evaluate(
    events_path: str | Path,
    spec: PredictionSpec,
    cutoff: datetime,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Backtest `spec` at `cutoff` on the events of `events_path`; returns the project's metrics (auc, log_loss,
    brier, ece, n_train, n_test, pos_rate, model), the windows, the time shift and the two baselines' metrics.
    `work_dir` keeps the store and the Dagster instance there (default: a temporary folder, removed)."""
    cutoff = utc(cutoff)
    if floor_hour(cutoff) != cutoff:
        raise ValueError(
            f"the cutoff {cutoff.isoformat()} is not on the hour: partitions are hours, e.g. use "
            f"{floor_hour(cutoff).isoformat()}."
        )
    if not spec.outcome.is_classification:
        raise ValueError(f"{spec.name} has a regression target (outcome.sum); evaluate scores event outcomes only.")
    events, times, earliest, shift = place_in_partitions(load_events(events_path, log), spec, cutoff, log)
    test_window = times.predicts

    with tempfile.TemporaryDirectory(prefix="automl-evaluate-") as temp:
        root = Path(work_dir or temp).resolve()
        storage = LocalStorage(root=str(root / "store"))
        resources = {**resources_for_env(), "storage": storage}
        event_store.write_events(storage, events)
        log(
            f"wrote {events.num_rows:,} events of [{earliest.isoformat()}, {test_window[1].isoformat()}) into "
            f"{storage.path()}; materialising events, hourly_rollups and {spec.name} at {hour_key(times.hour_start)} "
            f"in a Dagster instance under {root / 'dagster'}"
        )
        (root / "dagster").mkdir(parents=True, exist_ok=True)
        with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
            _materialise(resources, instance, spec, times, earliest)
        part = lambda asset, *name: layout.prediction_asset(spec.name, asset, times.hour_start, *name)  # noqa: E731
        scored = storage.read_table(*part("scores", "scores.parquet")).to_pandas()
        train_matrix = storage.path(*part("feature_matrix", "train", "matrix.parquet"))
        train = pd.read_parquet(train_matrix, columns=["user_id", "snapshot", "label"])
        chosen = storage.read_json(*part("model", "output", "metrics.json"))["chosen"]
        positives = _observed(resources, spec.outcome, test_window)

    y = scored["user_id"].isin(positives).to_numpy(int)
    score = scored["score"].to_numpy(float)
    train_rate = float(train["label"].mean())
    outcomes = outcome_events(events, spec.outcome)
    rfm = rfm_baseline(outcomes, train, times.train_cutoff, scored["user_id"], times.as_of, spec.lookback)
    # Times are reported in the data's own calendar, not the shifted one.
    back = lambda moment: (moment - shift).isoformat()  # noqa: E731
    return _report(
        y,
        score,
        len(train),
        model=chosen,
        prediction=spec.name,
        train_pos_rate=train_rate,
        cutoff=back(times.as_of),
        train_features_as_of=back(times.train_cutoff),
        training_snapshots=int(train["snapshot"].nunique()),
        train_label_window=[back(times.label_start), back(times.label_end)],
        test_window=[back(test_window[0]), back(test_window[1])],
        time_shift_weeks=shift // WEEK,
        # Whether a win over the RFM regression is more than the test users' noise: both score the same users.
        auc_minus_rfm=auc_difference(y, score, rfm) if 2 <= y.sum() <= len(y) - 2 else None,
        baselines={
            "rfm_logistic_regression": _report(y, rfm, len(train)),
            "constant": _report(y, np.full(len(y), train_rate), len(train)),
        },
    )


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def json_line(result: dict) -> str:
    """One line of JSON; an undefined metric (AUC of a single-class test set) is null rather than NaN."""
    return json.dumps(_json_safe(result))
