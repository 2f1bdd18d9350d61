"""Registered predictions: their specs live in the store, their names are keys of the `prediction` partitions."""

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import dagster as dg

from automl_assets.core import event_store, layout
from automl_assets.core.spec import PredictionSpec, SpecError, spec_from_text
from automl_assets.core.timewin import (
    PartitionTimes,
    TrainingSnapshot,
    hour_token,
    is_cadence_hour,
    partition_times,
    training_snapshots,
)
from automl_assets.partitions import PREDICTION, prediction_and_hour


def store_spec(storage, spec: PredictionSpec) -> None:
    """The normalised spec the assets read (and the schedules treat as active)."""
    storage.write_bytes(spec.to_yaml().encode(), *layout.spec_file(spec.name))


def require_supported(spec: PredictionSpec) -> None:
    """Refuse, before it is registered, a valid spec no run could train: it would fail every hour."""
    if not spec.outcome.is_classification:
        raise SpecError(
            f"{spec.name}: outcome.sum (a regression target) is not supported yet, so it is not registered; use "
            "`outcome: {event: ...}`"
        )


def register_prediction(instance: dg.DagsterInstance, storage, spec: PredictionSpec) -> bool:
    """Store the spec and add its name to the prediction partitions; True when the name is new."""
    require_supported(spec)
    store_spec(storage, spec)
    if instance.has_dynamic_partition(PREDICTION, spec.name):
        return False
    instance.add_dynamic_partitions(PREDICTION, [spec.name])
    return True


def active_predictions(storage) -> list[str]:
    """Predictions whose spec is in the store (a removed spec is retired: its history stays, its runs stop)."""
    return [name.removesuffix(".yaml") for name in storage.list_dir(*layout.specs_root()) if name.endswith(".yaml")]


def retire_prediction(storage, prediction: str) -> None:
    """Stop scheduling a prediction; its partitions, models and scores stay for history."""
    spec = storage.read_bytes(*layout.spec_file(prediction))
    storage.write_bytes(spec, *layout.retired_spec_file(prediction))
    storage.remove(*layout.spec_file(prediction))


def stored_spec(storage, prediction: str) -> PredictionSpec:
    parts = layout.spec_file(prediction)
    if not storage.exists(*parts):
        raise dg.Failure(
            f"prediction '{prediction}' has no spec in the store ({storage.path(*parts)}); "
            f"register it with `automl register path/to/{prediction}.yaml`."
        )
    try:
        return spec_from_text(storage.read_bytes(*parts).decode(), storage.path(*parts))
    except SpecError as error:
        raise dg.Failure(str(error)) from None


@dataclass(frozen=True)
class PredictionRun:
    """What every prediction asset needs to know about its partition."""

    prediction: str
    spec: PredictionSpec
    times: PartitionTimes

    @property
    def hour(self) -> datetime:
        return self.times.hour_start

    def parts(self, asset: str, *name: str) -> tuple[str, ...]:
        return layout.prediction_asset(self.prediction, asset, self.hour, *name)

    def describe(self) -> dict:
        return {
            "as_of": self.times.as_of.isoformat(),
            "train_cutoff": self.times.train_cutoff.isoformat(),
            "label_window": f"[{self.times.label_start.isoformat()}, {self.times.label_end.isoformat()})",
        }


def prediction_run(context: dg.AssetExecutionContext, storage) -> PredictionRun:
    prediction, hour = prediction_and_hour(context)
    spec = stored_spec(storage, prediction)
    times = partition_times(hour, spec.horizon_delta, spec.offset_delta, spec.lookback)
    return PredictionRun(prediction, spec, times)


INFER = ("infer",)  # where an asset keeps its inference rows, beside one folder per training snapshot
SNAPSHOTS_FILE = "snapshots.json"
TARGET_FILE = "target.json"  # beside a model: target_of the spec it was trained for
SCOPE_FILE = "scope.json"  # beside the cohort: whom the inference rows of the hour hold (active or whole cohort)


def recorded_scope(storage, prediction: str, hour: datetime) -> str | None:
    """Whom the cohort of (hour, prediction) holds, as its asset recorded it ("active" or "cohort"); None before it
    has run."""
    parts = layout.prediction_asset(prediction, "cohort", hour, SCOPE_FILE)
    return storage.read_json(*parts)["scope"] if storage.exists(*parts) else None


def snapshot_role(snapshot: TrainingSnapshot) -> tuple[str, ...]:
    return ("train", f"weeks_back={snapshot.weeks_back}")


def candidate_snapshots(storage, run: PredictionRun) -> list[TrainingSnapshot]:
    """The weekly training snapshots the spec allows and the history covers (features and cohort read back the longer
    of the lookback and `cohort.active_within`)."""
    reads_before = max(run.spec.lookback, run.spec.active_within_delta)
    return training_snapshots(run.times, run.spec.training_snapshots, reads_before, event_store.oldest_stored_hour(storage))


def stacked_snapshots(storage, run: PredictionRun) -> list[TrainingSnapshot]:
    """The training snapshots the cohort asset of this partition chose, newest first."""
    parts = run.parts("cohort", SNAPSHOTS_FILE)
    if not storage.exists(*parts):
        raise dg.Failure(
            f"{run.prediction} at {hour_token(run.hour)} has no training cohort ({storage.path(*parts)} is missing): "
            "materialise `cohort` in the same training run."
        )
    return candidate_snapshots(storage, run)[: storage.read_json(*parts)["count"]]


# A run tag that says whom a run scores: "active" (users seen in the partition's hour), "cohort" (everyone), or
# "auto" (the whole cohort when the hour ends at midnight UTC, the daily run; active users otherwise).
SCOPE_TAG = "automl/scope"
SCOPES = ("auto", "active", "cohort")
MODEL_KEY = dg.AssetKey("model")


def scoring_scope(context: dg.AssetExecutionContext, run: PredictionRun) -> str:
    scope = context.run.tags.get(SCOPE_TAG, "auto")
    if scope not in SCOPES:
        raise dg.Failure(f"run tag {SCOPE_TAG}={scope!r} is not one of {SCOPES}.")
    if scope == "auto":
        return "cohort" if is_cadence_hour(run.times.as_of, timedelta(days=1)) else "active"
    return scope


def trains_in_this_run(context: dg.AssetExecutionContext) -> bool:
    """Training rows (features as of C, labels, training cohort) are built only when the run also trains a model:
    an hourly scoring run reads one hour's worth of new data, not a second matrix."""
    return MODEL_KEY in context.job_def.asset_layer.executable_asset_keys


def cutoffs_by_role(context: dg.AssetExecutionContext, storage, run: PredictionRun) -> dict[tuple[str, ...], datetime]:
    """The cutoffs a run works at, by storage folder: each training snapshot (only when the run trains), and A."""
    train = {snapshot_role(s): s.cutoff for s in stacked_snapshots(storage, run)} if trains_in_this_run(context) else {}
    return {**train, INFER: run.times.as_of}


def model_version(prediction: str, hour: datetime) -> str:
    """Names a model by the partition that trained it, so a score row says which training it came from."""
    return f"{prediction}@{hour_token(hour)}"


def promotion_parts(prediction: str, hour: datetime) -> tuple[str, ...]:
    return layout.prediction_asset(prediction, "model", hour, "promotion.json")


def calibrator_parts(prediction: str, hour: datetime) -> tuple[str, ...]:
    return layout.prediction_asset(prediction, "calibrator", hour, "calibrator.json")


def trained_hours(storage, prediction: str) -> list[datetime]:
    root = layout.prediction_asset_root(prediction, "model")
    return sorted(layout.folder_hour(name) for name in storage.list_dir(*root) if name.startswith(layout.HOUR_PREFIX))


def target_of(spec: PredictionSpec) -> dict:
    """What a model predicts. A spec re-registered with another outcome, horizon or offset asks a new question: the
    models of the old one neither score it nor stand in the way of its first model at the promotion gate."""
    return {"outcome": spec.outcome.model_dump(mode="json"), "horizon": spec.horizon, "offset": spec.offset}


def trained_for(storage, prediction: str, hour: datetime, target: dict) -> bool:
    """Whether a model of `target` was trained at `hour`."""
    parts = layout.prediction_asset(prediction, "model", hour, TARGET_FILE)
    return storage.exists(*parts) and storage.read_json(*parts) == target


def newest_model(storage, prediction: str) -> datetime | None:
    """The hour of the prediction's newest model in force, whatever hour is scored."""
    return model_in_force(storage, prediction, datetime.max.replace(tzinfo=timezone.utc))


def model_in_force(storage, prediction: str, hour: datetime, before: bool = False) -> datetime | None:
    """The hour of the newest promoted model of the spec's current target trained at (or, with `before`, strictly
    before) `hour` whose calibrator is stored: the model that scores that hour."""
    target = target_of(stored_spec(storage, prediction))
    for trained in reversed(trained_hours(storage, prediction)):
        if trained > hour or (before and trained == hour):
            continue
        promotion = promotion_parts(prediction, trained)
        calibrated = calibrator_parts(prediction, trained)
        promoted = storage.exists(*promotion) and storage.read_json(*promotion)["promoted"]
        if promoted and storage.exists(*calibrated) and trained_for(storage, prediction, trained, target):
            return trained
    return None
