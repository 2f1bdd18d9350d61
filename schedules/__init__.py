"""Schedules and sensors: the graph runs itself once a prediction is defined (docs/automation.md).

- every hour: ingest the hour that just ended; when an ingest run succeeds, score each prediction's newest hour
  (users active in it), or retrain first when the prediction's `retrain_every` cadence is due;
- every day: score each prediction's whole cohort as of midnight UTC;
- sensors: spec files (register, first training, retire), new raw files (ingest), drift (retrain).
"""

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from automl_assets.core import event_store, layout, quality
from automl_assets.core.spec import SpecError, load_spec
from automl_assets.core.timewin import (
    HOUR,
    floor_hour,
    hour_from_key,
    hour_from_token,
    hour_key,
    is_cadence_hour,
    last_ended_hour,
)
from automl_assets.partitions import PREDICTION, ingest_ranges, prediction_hour_key
from automl_assets.predictions import (
    INFER,
    SCOPE_TAG,
    active_predictions,
    model_in_force,
    recorded_scope,
    require_supported,
    retire_prediction,
    store_spec,
    stored_spec,
    target_of,
    trained_for,
)
from automl_assets.runs import RANGE_END_TAG, RANGE_START_TAG
from jobs import event_store_job, prediction_job, scoring_job
from resources.spec_folder import SpecFolder
from resources.storage import LocalStorage

RUNNING = dg.DefaultScheduleStatus.RUNNING
SENSOR_RUNNING = dg.DefaultSensorStatus.RUNNING
REASON_TAG = "automl/reason"
STAGING_SECONDS_PER_TICK = 20  # staging parses files inside the sensor: bound a tick's work, the cursor resumes


def retrain_due(storage, prediction: str, hour: datetime) -> bool:
    """Training is due at the cadence's hours, or while the prediction has no model in force, unless a model of
    its target was trained at this very hour (another ingest of the hour rescores it, it does not train twice)."""
    spec = stored_spec(storage, prediction)
    if trained_for(storage, prediction, hour, target_of(spec)):
        return False
    return model_in_force(storage, prediction, hour) is None or is_cadence_hour(hour + HOUR, spec.retrain_delta)


def prediction_request(storage, prediction: str, hour: datetime, scope: str, reason: str, train: bool | None = None) -> dg.RunRequest:
    """A run of the prediction chain for (hour, prediction): the whole chain when training is due (or asked),
    the scoring path otherwise."""
    train = retrain_due(storage, prediction, hour) if train is None else train
    job = prediction_job if train else scoring_job
    return dg.RunRequest(
        run_key=f"{job.name}|{prediction}|{hour_key(hour)}|{scope}|{hashlib.sha1(reason.encode()).hexdigest()[:8]}",
        job_name=job.name,
        partition_key=prediction_hour_key(prediction, hour),
        tags={SCOPE_TAG: scope, REASON_TAG: reason},
    )


def range_request(start: datetime, end: datetime, run_key: str) -> dg.RunRequest:
    """One event-store run for the hours [start, end)."""
    return dg.RunRequest(
        run_key=run_key,
        job_name=event_store_job.name,
        tags={RANGE_START_TAG: hour_key(start), RANGE_END_TAG: hour_key(end - HOUR)},
    )


@dg.schedule(
    cron_schedule="5 * * * *",
    job=event_store_job,
    execution_timezone="UTC",
    default_status=RUNNING,
    description="Ingest and roll up the hour that just ended (5 minutes later, for late files).",
)
def hourly_ingest(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    hour = last_ended_hour(context.scheduled_execution_time)
    return range_request(hour, hour + HOUR, run_key=f"hourly|{hour_key(hour)}")


def ingested_events(run: dg.DagsterRun) -> bool:
    """An ingest: an event_store_job run, or a run of the asset graph that materialised `events` (the UI's
    Materialize and backfills of the event store run as Dagster's asset job)."""
    return run.job_name == event_store_job.name or dg.AssetKey("events") in (run.asset_selection or ())


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    request_jobs=[prediction_job, scoring_job],
    default_status=SENSOR_RUNNING,
    description="After new events are in (any successful run that materialised `events`): score every prediction's "
    "newest hour (users active in it), retraining first when its cadence is due.",
)
def score_after_ingest(context: dg.RunStatusSensorContext, storage: LocalStorage):
    if not ingested_events(context.dagster_run):
        return dg.SkipReason(f"run {context.dagster_run.run_id[:8]} ingested no events")
    tags = context.dagster_run.tags
    end_key = tags.get(RANGE_END_TAG) or tags.get("dagster/partition")
    if not end_key:
        return dg.SkipReason("the ingest run has no hour range tags")
    now = datetime.now(timezone.utc)
    return ingest_scoring_requests(storage, context.dagster_run.run_id, hour_from_key(end_key), now, context.instance)


# Runs that have not finished: a training of the partition among them is the one an ingest would otherwise repeat.
UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def training_under_way(instance: dg.DagsterInstance, prediction: str, hour: datetime) -> bool:
    """Whether a prediction_job of (hour, prediction) is queued or running (two ingests of one hour, say the landing
    sensor's and the schedule's, each find the retrain due before either has trained)."""
    partition = str(prediction_hour_key(prediction, hour))
    runs = dg.RunsFilter(job_name=prediction_job.name, statuses=UNFINISHED, tags={"dagster/partition": partition})
    return bool(instance.get_run_ids(filters=runs, limit=1))


def ingest_scoring_requests(
    storage, ingest_run_id: str, last_hour: datetime, now: datetime, instance: dg.DagsterInstance
) -> list[dg.RunRequest]:
    """The runs an ingest that ended at `last_hour` asks for: every prediction's newest hour, but never one still
    under way (a file can reach into it: it is scored once it is over), nor one before the prediction's first model
    when a later model exists. Each ingest gets its own run key, so late events of an hour already scored score it
    again: a scoring run when a training of the hour is already queued or running (the run queue lets one run of a
    partition in at a time, so it scores with that training's model)."""
    hour = min(last_hour, last_ended_hour(now))
    reason = f"new events (ingest run {ingest_run_id[:8]})"
    newest = event_store.newest_stored_hour(storage)
    requests = []
    for name in active_predictions(storage):
        if model_in_force(storage, name, hour) is None and model_in_force(storage, name, newest) is not None:
            continue  # old data (a re-export of a past month): no model scores that hour, and training for it is not due
        train = retrain_due(storage, name, hour) and not training_under_way(instance, name, hour)
        requests.append(prediction_request(storage, name, hour, rescoring_scope(storage, name, hour), reason, train=train))
    return requests


def rescoring_scope(storage, prediction: str, hour: datetime) -> str:
    """The users active in the hour, unless the hour was scored for the whole cohort (the daily run's hour, when
    late events arrive after it): rescoring it keeps the whole-cohort output the drift sensor compares."""
    return "cohort" if recorded_scope(storage, prediction, hour) == "cohort" else "active"


@dg.schedule(
    cron_schedule="30 0 * * *",
    job=scoring_job,
    execution_timezone="UTC",
    default_status=RUNNING,
    description="Score every prediction's whole cohort as of midnight UTC.",
)
def daily_scoring(context: dg.ScheduleEvaluationContext, storage: LocalStorage):
    hour = floor_hour(context.scheduled_execution_time).replace(hour=0) - HOUR
    requests = [
        prediction_request(storage, name, hour, "cohort", "daily", train=False)
        for name in active_predictions(storage)
        if model_in_force(storage, name, hour) is not None
    ]
    return requests or dg.SkipReason("no prediction has a model yet")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dg.sensor(
    jobs=[prediction_job],
    minimum_interval_seconds=30,
    default_status=SENSOR_RUNNING,
    description="Registers each new or changed spec in the specs folder and requests its first training and "
    "scoring; a removed spec is retired (its schedules stop, its history stays).",
)
def prediction_specs(context: dg.SensorEvaluationContext, storage: LocalStorage, spec_folder: SpecFolder):
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    folder = Path(spec_folder.path)
    files = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
    current, partitions, runs, notes = {}, [], [], []
    newest = event_store.newest_stored_hour(storage)
    for name, path in files.items():
        digest = _digest(path)
        current[name] = digest
        if seen.get(name) == digest:
            continue
        try:
            spec = load_spec(path)
            require_supported(spec)
        except SpecError as error:
            notes.append(str(error))
            continue
        spec_parts = layout.spec_file(spec.name)
        unchanged = storage.exists(*spec_parts) and storage.read_bytes(*spec_parts) == spec.to_yaml().encode()
        store_spec(storage, spec)
        if not context.instance.has_dynamic_partition(PREDICTION, spec.name):
            partitions.append(spec.name)
        if unchanged and newest is not None and model_in_force(storage, spec.name, newest) is not None:
            # Registered as it is already (`automl register`, the demo) and trained: a first sight is no reason to train.
            notes.append(f"{spec.name} is registered as it is and has a model in force: nothing to train")
            continue
        if newest is None:
            notes.append(f"registered {spec.name}; the event store is empty, so training waits for events")
            continue
        runs.append(prediction_request(storage, spec.name, newest, "cohort", f"spec {digest}", train=True))
        notes.append(f"registered {spec.name}: training and scoring at {hour_key(newest)}")
    for name in sorted(set(seen) - set(files)):
        if storage.exists(*layout.spec_file(name)):
            retire_prediction(storage, name)
            notes.append(f"retired {name}: its spec file was removed (history kept)")
    for note in notes:
        context.log.info(note)
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[dg.DynamicPartitionsDefinition(name=PREDICTION).build_add_request(partitions)]
        if partitions
        else [],
        cursor=json.dumps(current, sort_keys=True),
        skip_reason=None if runs else dg.SkipReason("; ".join(notes) or "no new or changed spec"),
    )


def landing_cursor_key(marker: str) -> str:
    """A landing file's state (event_store.landing_marker) as the landing sensor's cursor keeps it: 16 hex digits of
    its hash instead of the path, size and times, so that a year of hourly files from a dozen sources takes about
    2 MB of cursor, read and written every tick, rather than 10."""
    return hashlib.sha256(marker.encode()).hexdigest()[:16]


@dg.sensor(
    jobs=[event_store_job],
    minimum_interval_seconds=30,
    default_status=SENSOR_RUNNING,
    description="Stages raw files newly dropped under landing/ and requests one ingest run over the hours they touch.",
)
def new_raw_events(context: dg.SensorEvaluationContext, storage: LocalStorage):
    # A cursor written before the keys were hashed holds the markers themselves: hashed, they are its keys.
    seen = {entry if "|" not in entry else landing_cursor_key(entry) for entry in json.loads(context.cursor or "[]")}
    listed, fresh = set(), []
    for path in event_store.landing_files(storage):
        try:
            key = landing_cursor_key(event_store.landing_marker(path))
        except FileNotFoundError:  # removed since it was listed
            continue
        listed.add(key)
        if key not in seen:
            fresh.append((key, path))
    # Files removed from landing/ leave the cursor, which holds only what is kept there; a listing that finds no file
    # at all (the folder unmounted or being replaced) keeps it whole, or the folder's return would ingest it all again.
    kept = seen & listed if listed else seen
    if not fresh:
        skip = dg.SkipReason("no new files under landing/")
        return skip if kept == seen else dg.SensorResult(skip_reason=skip, cursor=json.dumps(sorted(kept)))
    deadline = time.monotonic() + STAGING_SECONDS_PER_TICK
    batch, hours, digests, unreadable = [], set(), [], []
    for key, path in fresh:
        if batch and time.monotonic() > deadline:
            break
        manifest = event_store.stage_landing_file(storage, path)
        batch.append((key, path))
        if "error" in manifest:  # logged and skipped: the other files go on; read again once it or its mapping changes
            context.log.error(manifest["error"])
            unreadable.append(manifest["error"])
            continue
        if manifest["quarantined"]:
            context.log.warning(f"{path}: quarantined records by reason {manifest['quarantined']}")
        hours.update(hour_from_token(token) for token in manifest["hours"])
        digests.append(manifest["digest"])
    cursor = json.dumps(sorted(kept | {key for key, _ in batch}))
    ranges = ingest_ranges(hours, datetime.now(timezone.utc))
    if not ranges:
        skip = dg.SkipReason(" ".join(["new files hold no valid event in an hour that is over.", *unreadable]))
        return dg.SensorResult(skip_reason=skip, cursor=cursor)
    run_key = "landing|" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]
    requests = [range_request(start, end, f"{run_key}|{hour_key(start)}") for start, end in ranges]
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def newest_whole_cohort_hour(storage, prediction: str, after: datetime) -> datetime | None:
    """The newest hour after `after` whose inference matrix holds the whole cohort (a daily run's, or one tagged
    automl/scope=cohort): an hourly run's holds only the users active in its hour, who are not the population the
    model was trained on, and compared with it they would always look drifted."""
    for name in reversed(storage.list_dir(*layout.prediction_asset_root(prediction, "feature_matrix"))):
        hour = layout.folder_hour(name)
        # The model's own hour counts: its training features are a horizon older (and with the default cadence the
        # nightly retrain and the daily cohort run share 23:00).
        if hour < after:
            return None
        matrix = layout.prediction_asset(prediction, "feature_matrix", hour, *INFER, "matrix.parquet")
        if recorded_scope(storage, prediction, hour) == "cohort" and storage.exists(*matrix):
            return hour
    return None


@dataclass(frozen=True)
class DriftReport:
    psi: float
    why: str
    trained: datetime  # the model in force
    compared: datetime  # the whole-cohort inference matrix it was compared with


def drift_report(storage, prediction: str) -> DriftReport | None:
    """The worst PSI between the training matrix of the model in force and the newest whole-cohort inference matrix
    (features and calibrated scores), with a sentence naming where it is."""
    newest = event_store.newest_stored_hour(storage)
    trained = model_in_force(storage, prediction, newest) if newest else None
    latest = newest_whole_cohort_hour(storage, prediction, trained) if trained else None
    if latest is None:
        return None
    train = pd.read_parquet(storage.path(*layout.prediction_asset(prediction, "feature_matrix", trained, "train", "matrix.parquet")))
    train = train[train["snapshot"] == 0]  # the newest training snapshot: the population the model was validated on
    infer_path = layout.prediction_asset(prediction, "feature_matrix", latest, *INFER, "matrix.parquet")
    infer = pd.read_parquet(storage.path(*infer_path))
    shifts = {
        column: quality.population_stability_index(train[column].to_numpy(), infer[column].to_numpy())
        for column in train.columns
        if column not in ("user_id", "label") and column in infer.columns
    }
    scores_path = layout.prediction_asset(prediction, "scores", latest, "scores.parquet")
    if storage.exists(*scores_path):
        reference = storage.read_json(*layout.prediction_asset(prediction, "calibrator", trained, "calibrator.json"))["reference_quantiles"]
        shifts["score"] = quality.population_stability_index(np.asarray(reference), pd.read_parquet(storage.path(*scores_path))["score"].to_numpy())
    worst = max(shifts, key=shifts.get)
    why = f"PSI {shifts[worst]:.2f} on {worst} between the training matrix of {hour_key(trained)} and the inference matrix of {hour_key(latest)}"
    return DriftReport(shifts[worst], why, trained, latest)


@dg.sensor(
    jobs=[prediction_job],
    minimum_interval_seconds=1800,
    default_status=SENSOR_RUNNING,
    description=f"Requests a retrain when a feature's or the score's PSI between the training matrix and the newest "
    f"whole-cohort inference matrix (the daily run's) exceeds {quality.PSI_RETRAIN}.",
)
def drift(context: dg.SensorEvaluationContext, storage: LocalStorage):
    # Per prediction, the (model, whole-cohort matrix) pair that last asked for a retrain: a retrain that fails or
    # is not promoted leaves the same pair, which asks again only once a new daily matrix exists, not every hour.
    requested: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    runs, notes = [], []
    newest = event_store.newest_stored_hour(storage)
    for name in active_predictions(storage):
        report = drift_report(storage, name)
        if report is None:
            continue
        notes.append(f"{name}: {report.why}")
        pair = f"{hour_key(report.trained)}|{hour_key(report.compared)}"
        # A model trained at the newest hour has seen every stored event: a retrain would learn nothing newer.
        if report.psi > quality.PSI_RETRAIN and requested.get(name) != pair and report.trained < newest:
            runs.append(prediction_request(storage, name, newest, "active", f"drift: {report.why}", train=True))
            requested[name] = pair
    return dg.SensorResult(
        run_requests=runs,
        cursor=json.dumps(requested, sort_keys=True),
        skip_reason=None if runs else dg.SkipReason("; ".join(notes) or "nothing to compare yet"),
    )


schedules = [hourly_ingest, daily_scoring]
sensors = [score_after_ingest, prediction_specs, new_raw_events, drift]
