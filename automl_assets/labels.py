"""Labels: each user's outcome in the label window [C + offset, A) after the training cutoff C."""

import dagster as dg

from automl_assets.core.feature_sql import label_query
from automl_assets.core.timewin import hours_between
from automl_assets.events import events
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import prediction_run
from automl_assets.taxonomy import PREDICTION_GROUP, SAME_HOUR, taxonomy
from resources.engine import EngineResource
from resources.storage import LocalStorage


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[taxonomy, dg.AssetDep(events, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet"},
    description="Users with the outcome in the label window after the training cutoff, and how much of it. "
    "The window is a whole number of hour files, so no event at or after A is read.",
)
def labels(context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    sql = engine.engine()
    outcome = run.spec.outcome
    sql.register_events(storage, hours_between(run.times.label_start, run.times.label_end))
    query = label_query(outcome.event, outcome.where, sum_revenue=not outcome.is_classification)
    positives = sql.write(query, storage, run.parts("labels", "labels"))
    return dg.MaterializeResult(
        metadata={
            "users_with_outcome": positives,
            "outcome": dg.MetadataValue.json(outcome.model_dump()),
            **run.describe(),
        }
    )
