"""Taxonomy: the events and property values a prediction's features are built from, chosen from the data."""

import dagster as dg

from automl_assets.core import layout
from automl_assets.core.feature_sql import Taxonomy
from automl_assets.core.taxonomy import event_stats_sql, property_stats_sql, select_taxonomy, user_property_stats_sql
from automl_assets.core.timewin import epoch_hour, hours_between
from automl_assets.events import hourly_rollups
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import model_in_force, model_version, prediction_run, trains_in_this_run
from resources.engine import EngineResource
from resources.storage import LocalStorage

# Prediction assets depend on the rollups of their own hour; the features read the whole lookback before it.
SAME_HOUR = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="hour")
PREDICTION_GROUP = "prediction"
TAXONOMY_FILE = "taxonomy.json"


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[dg.AssetDep(hourly_rollups, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "json"},
    description="Top events by volume, most-used event-property values and user-property values (with "
    "cardinality caps) in the lookback before the training cutoff; a scoring-only run reuses the taxonomy of the "
    "model in force.",
)
def taxonomy(context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    in_force = None if trains_in_this_run(context) else model_in_force(storage, run.prediction, run.hour)
    if in_force is not None:
        # Scoring with an existing model: its features must be the ones it was trained on.
        stored = storage.read_json(*layout.prediction_asset(run.prediction, "model", in_force, TAXONOMY_FILE))
        storage.write_json(stored, *run.parts("taxonomy", TAXONOMY_FILE))
        return dg.MaterializeResult(
            metadata={"source": f"the model in force, {model_version(run.prediction, in_force)}", **summary(stored), **run.describe()}
        )
    sql = engine.engine()
    start, cutoff = run.times.train_lookback_start, run.times.train_cutoff
    sql.register_rollups(storage, hours_between(start, cutoff))
    window = (epoch_hour(start), epoch_hour(cutoff))
    event_stats = sql.to_pandas(event_stats_sql(*window))
    if event_stats.empty:
        raise dg.Failure(
            f"no events in the lookback [{start.isoformat()}, {cutoff.isoformat()}) before the training cutoff of "
            f"{run.prediction}; materialise `events` and `hourly_rollups` for those hours, or pick a later hour."
        )
    spec = run.spec
    chosen, report = select_taxonomy(
        event_stats,
        sql.to_pandas(property_stats_sql(*window)),
        sql.to_pandas(user_property_stats_sql(*window)),
        top_events=spec.top_events,
        top_properties=spec.top_properties,
        max_property_values=spec.max_property_values,
        user_property_values=spec.user_property_values,
        weeks=spec.lookback_weeks,
    )
    volumes = event_stats.set_index("event_type")["n"]
    stored = {
        "taxonomy": chosen.to_dict(),
        "report": report,
        "volumes": {event: int(volumes[event]) for event in chosen.events},
        **run.describe(),
    }
    storage.write_json(stored, *run.parts("taxonomy", TAXONOMY_FILE))
    return dg.MaterializeResult(metadata={"source": "chosen from the lookback before the training cutoff", **summary(stored), **run.describe()})


def summary(stored: dict) -> dict:
    chosen = Taxonomy.from_dict(stored["taxonomy"])
    volumes = stored["volumes"]
    table = "\n".join(f"| {i + 1} | {e} | {volumes[e]:,} |" for i, e in enumerate(chosen.events))
    return {
        "selected_events": dg.MetadataValue.md("| rank | event | events in lookback |\n|---|---|---|\n" + table),
        "n_events": len(chosen.events),
        "event_properties": dg.MetadataValue.json({f"{p.event_type}.{p.key}": list(p.values) for p in chosen.event_properties}),
        "user_properties": dg.MetadataValue.json({p.key: list(p.values) for p in chosen.user_properties}),
        "left_out": dg.MetadataValue.json(stored["report"]),
    }
