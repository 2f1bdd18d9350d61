"""Registered predictions: their specs live in the store, their names are keys of the `prediction` partitions."""

from dataclasses import dataclass
from datetime import datetime

import dagster as dg

from automl_assets.core import layout
from automl_assets.core.spec import PredictionSpec, SpecError, spec_from_text
from automl_assets.core.timewin import PartitionTimes, partition_times
from automl_assets.partitions import PREDICTION, prediction_and_hour


def register_prediction(instance: dg.DagsterInstance, storage, spec: PredictionSpec) -> bool:
    """Store the spec and add its name to the prediction partitions; True when the name is new."""
    storage.write_bytes(spec.to_yaml().encode(), *layout.spec_file(spec.name))
    if instance.has_dynamic_partition(PREDICTION, spec.name):
        return False
    instance.add_dynamic_partitions(PREDICTION, [spec.name])
    return True


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
