"""Cohort: the users a prediction trains on (as of the training cutoff) and scores (as of the partition's end)."""

import dagster as dg
from dagster_pyspark import LazyPySparkResource

from automl_assets.core.feature_sql import cohort_query
from automl_assets.core.spark_jobs import prepare, register_rollups, write_frame
from automl_assets.core.timewin import HOUR, epoch_hour, hours_between
from automl_assets.features import roles
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import prediction_run, scoring_scope
from automl_assets.taxonomy import PREDICTION_GROUP, SAME_HOUR
from automl_assets.events import hourly_rollups
from resources.storage import LocalStorage


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[dg.AssetDep(hourly_rollups, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"spark", "parquet"},
    description="Users active within the spec's `cohort.active_within` before each cutoff whose latest user "
    "properties match `cohort.where`; the inference cohort of an hourly run keeps those active in the hour.",
)
def cohort(context: dg.AssetExecutionContext, storage: LocalStorage, spark: LazyPySparkResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    session = prepare(spark.spark_session)
    spec = run.spec
    active_hours = int(spec.active_within_delta / HOUR)
    cutoffs = roles(context, run)
    earliest = min(cutoffs.values()) - max(spec.active_within_delta, spec.lookback)
    register_rollups(session, storage, hours_between(earliest, run.times.as_of))
    scope = scoring_scope(context, run)
    rows = {}
    for role, cutoff in cutoffs.items():
        frame = session.sql(cohort_query(epoch_hour(cutoff), active_hours, spec.lookback_weeks, dict(spec.cohort.where)))
        if role == "infer" and scope == "active":
            frame = frame.where("active_last_hour = 1")
        rows[role] = write_frame(frame, storage, run.parts("cohort", role))
    if rows.get("train") == 0:
        raise dg.Failure(
            f"the training cohort of {run.prediction} as of {run.times.train_cutoff.isoformat()} is empty: no user "
            f"was active within {spec.cohort.active_within} (filter {dict(spec.cohort.where)}); check the filter "
            "or materialise more history."
        )
    return dg.MaterializeResult(metadata={**{f"{role}_users": n for role, n in rows.items()}, "scope": scope, **run.describe()})
