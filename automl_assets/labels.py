"""Labels: each user's outcome in the label window of each training snapshot; the newest is [C + offset, A)."""

import dagster as dg

from automl_assets.cohort import cohort
from automl_assets.core.feature_sql import label_query
from automl_assets.core.timewin import hours_between
from automl_assets.events import events
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import prediction_run, snapshot_role, stacked_snapshots
from automl_assets.taxonomy import PREDICTION_GROUP, SAME_HOUR, taxonomy
from resources.engine import EngineResource
from resources.storage import LocalStorage


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[taxonomy, cohort, dg.AssetDep(events, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet"},
    description="Users with the outcome in the label window after each training snapshot's cutoff, and how much of "
    "it. A window is a whole number of hour files, and every window ends at or before A, so no event at or after A "
    "is read.",
)
def labels(context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    sql = engine.engine()
    outcome = run.spec.outcome
    query = label_query(outcome.event, outcome.where, sum_revenue=not outcome.is_classification)
    users_with_outcome = {}
    for snapshot in stacked_snapshots(storage, run):
        sql.register_events(storage, hours_between(snapshot.label_start, snapshot.label_end))
        users_with_outcome[snapshot.label_start.isoformat()] = sql.write(
            query, storage, run.parts("labels", *snapshot_role(snapshot))
        )
    return dg.MaterializeResult(
        metadata={
            "users_with_outcome": next(iter(users_with_outcome.values())),
            "users_with_outcome_by_window_start": dg.MetadataValue.json(users_with_outcome),
            "outcome": dg.MetadataValue.json(outcome.model_dump()),
            **run.describe(),
        }
    )
