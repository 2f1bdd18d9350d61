"""Cohort: the users a prediction trains on (as of the training cutoff) and scores (as of the partition's end)."""

import dagster as dg

from automl_assets.core.feature_sql import cohort_query
from automl_assets.core.timewin import HOUR, epoch_hour, hours_between
from automl_assets.features import roles
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import prediction_run, scoring_scope
from automl_assets.taxonomy import PREDICTION_GROUP, SAME_HOUR
from automl_assets.events import hourly_rollups
from resources.engine import EngineResource
from resources.storage import LocalStorage


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[dg.AssetDep(hourly_rollups, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet"},
    description="Users active within the spec's `cohort.active_within` before each cutoff whose latest user "
    "properties match `cohort.where`; the inference cohort of an hourly run keeps those active in the hour.",
)
def cohort(context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    sql = engine.engine()
    spec = run.spec
    active_hours = int(spec.active_within_delta / HOUR)
    cutoffs = roles(context, run)
    earliest = min(cutoffs.values()) - max(spec.active_within_delta, spec.lookback)
    sql.register_rollups(storage, hours_between(earliest, run.times.as_of))
    scope = scoring_scope(context, run)
    rows = {}
    for role, cutoff in cutoffs.items():
        query = cohort_query(epoch_hour(cutoff), active_hours, spec.lookback_weeks, dict(spec.cohort.where))
        if role == "infer" and scope == "active":
            query = f"SELECT * FROM ({query}) c WHERE active_last_hour = 1"
        rows[role] = sql.write(query, storage, run.parts("cohort", role))
    if rows.get("train") == 0:
        raise dg.Failure(
            f"the training cohort of {run.prediction} as of {run.times.train_cutoff.isoformat()} is empty: no user "
            f"was active within {spec.cohort.active_within} (filter {dict(spec.cohort.where)}); check the filter "
            "or materialise more history."
        )
    return dg.MaterializeResult(metadata={**{f"{role}_users": n for role, n in rows.items()}, "scope": scope, **run.describe()})
