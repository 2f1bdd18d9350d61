"""Feature aggregates: rolling weekly windows per selected event, event-property and user-property features, as
of the training cutoff (for training) and as of the partition's end (for inference), from one SQL definition."""

import dagster as dg
from dagster_pyspark import LazyPySparkResource

from automl_assets.core.feature_sql import Taxonomy, feature_query
from automl_assets.core.spark_jobs import prepare, register_rollups, write_frame
from automl_assets.core.timewin import epoch_hour, hours_between
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import PredictionRun, prediction_run
from automl_assets.taxonomy import PREDICTION_GROUP, taxonomy
from resources.storage import LocalStorage


def load_taxonomy(storage, run: PredictionRun) -> Taxonomy:
    return Taxonomy.from_dict(storage.read_json(*run.parts("taxonomy", "taxonomy.json"))["taxonomy"])


def cutoffs(run: PredictionRun) -> dict[str, object]:
    """Training rows are as of C, inference rows as of A: the same definitions at two cutoffs."""
    return {"train": run.times.train_cutoff, "infer": run.times.as_of}


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[taxonomy],
    group_name=PREDICTION_GROUP,
    kinds={"spark", "parquet"},
    description="Per user: counts in 8 rolling weeks per selected event, recency, revenue, event-property value "
    "counts and first/last user-property values, as of the training cutoff and as of the partition's end.",
)
def feature_aggregates(
    context: dg.AssetExecutionContext, storage: LocalStorage, spark: LazyPySparkResource
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    session = prepare(spark.spark_session)
    chosen = load_taxonomy(storage, run)
    register_rollups(session, storage, hours_between(run.times.train_lookback_start, run.times.as_of))
    rows = {}
    for role, cutoff in cutoffs(run).items():
        query = feature_query(chosen, epoch_hour(cutoff))
        rows[role] = write_frame(session.sql(query.sql), storage, run.parts("feature_aggregates", role))
    storage.write_json(list(query.columns), *run.parts("feature_aggregates", "columns.json"))
    return dg.MaterializeResult(
        metadata={
            "train_users": rows["train"],
            "infer_users": rows["infer"],
            "n_features": len(query.columns),
            "feature_columns_sample": dg.MetadataValue.json(list(query.columns[:20])),
            **run.describe(),
        }
    )
