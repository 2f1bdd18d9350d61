"""Feature matrix: cohort x features (x label for training), as parquet and, for training, a TFRecord file that
`tf.data` streams. Training and inference rows come from the same feature definitions."""

from datetime import datetime

import dagster as dg
import pandas as pd
from dagster_pyspark import LazyPySparkResource
from pyspark.sql import DataFrame, SparkSession

from automl_assets import checks
from automl_assets.cohort import cohort
from automl_assets.core.feature_sql import matrix_query
from automl_assets.core.spark_jobs import prepare, write_frame
from automl_assets.core.tfrecord import write_tfrecord
from automl_assets.core.timewin import hour_from_token
from automl_assets.features import feature_aggregates
from automl_assets.labels import labels
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import PredictionRun, prediction_run, trains_in_this_run
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.storage import LocalStorage

MATRIX = "matrix.parquet"
TFRECORD = "matrix.tfrecord"


def matrix_parts(run: PredictionRun, role: str, name: str = MATRIX) -> tuple[str, ...]:
    return run.parts("feature_matrix", role, name)


def matrix_frame(session: SparkSession, cohort: DataFrame, features: DataFrame, columns, labels: DataFrame | None = None) -> DataFrame:
    """Cohort users left-joined to their features (and labels): the one join behind every matrix."""
    cohort.createOrReplaceTempView("cohort")
    features.createOrReplaceTempView("features")
    if labels is not None:
        labels.createOrReplaceTempView("labels")
    return session.sql(matrix_query(tuple(columns), with_label=labels is not None))


def history_start(storage) -> datetime | None:
    hours = storage.list_dir("events")
    return hour_from_token(hours[0].removeprefix("hour=")) if hours else None


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_aggregates, labels, cohort],
    group_name=PREDICTION_GROUP,
    kinds={"spark", "parquet", "tensorflow"},
    check_specs=[checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE],
    description="Training matrix (cohort as of C, features as of C, label; training runs only) and inference "
    "matrix (cohort and features as of A), parquet; the training matrix also as TFRecord for tf.data.",
)
def feature_matrix(
    context: dg.AssetExecutionContext, storage: LocalStorage, spark: LazyPySparkResource
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    if not run.spec.outcome.is_classification:
        raise dg.Failure(
            f"{run.prediction} asks for a regression target (outcome.sum); only event outcomes (classification) "
            "are supported so far. Use `outcome: {event: ...}`."
        )
    session = prepare(spark.spark_session)
    columns = storage.read_json(*run.parts("feature_aggregates", "columns.json"))
    read = lambda *parts: session.read.parquet(storage.path(*parts))  # noqa: E731
    infer_rows = write_frame(
        matrix_frame(session, read(*run.parts("cohort", "infer")), read(*run.parts("feature_aggregates", "infer")), columns),
        storage,
        matrix_parts(run, "infer"),
    )
    storage.write_json(columns, *run.parts("feature_matrix", "columns.json"))
    metadata = {"infer_rows": infer_rows, "n_features": len(columns), **run.describe()}
    if not trains_in_this_run(context):
        reason = "This run only scores: no training matrix was built."
        return dg.MaterializeResult(
            metadata=metadata, check_results=[checks.skipped(spec, reason) for spec in (checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE)]
        )

    train_frame = matrix_frame(
        session,
        read(*run.parts("cohort", "train")),
        read(*run.parts("feature_aggregates", "train")),
        columns,
        labels=read(*run.parts("labels", "labels")),
    )
    train_rows = write_frame(train_frame, storage, matrix_parts(run, "train"))
    train = pd.read_parquet(storage.path(*matrix_parts(run, "train")))
    with storage.temp_dir() as temp:
        write_tfrecord(train, temp / TFRECORD, columns)
        storage.install(temp / TFRECORD, *matrix_parts(run, "train", TFRECORD))
    positives = int(train["label"].sum())
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "train_rows": train_rows,
            "positives": positives,
            "positive_rate": float(positives / max(train_rows, 1)),
            "path": dg.MetadataValue.path(storage.path(*run.parts("feature_matrix"))),
        },
        check_results=[
            checks.training_eligibility(train, history_start(storage), run.times.train_lookback_start),
            checks.no_leakage(train, columns),
        ],
    )
