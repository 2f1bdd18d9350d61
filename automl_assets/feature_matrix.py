"""Feature matrix: cohort x features (x label for training), as parquet and, for training, a TFRecord file that
`tf.data` streams. Training and inference rows come from the same feature definitions."""

import dagster as dg
import pandas as pd
from dagster_pyspark import LazyPySparkResource

from automl_assets.core.feature_sql import matrix_query
from automl_assets.core.spark_jobs import prepare, write_frame
from automl_assets.core.tfrecord import write_tfrecord
from automl_assets.cohort import cohort
from automl_assets.features import feature_aggregates
from automl_assets.labels import labels
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import PredictionRun, prediction_run
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.storage import LocalStorage

MATRIX = "matrix.parquet"
TFRECORD = "matrix.tfrecord"


def matrix_parts(run: PredictionRun, role: str, name: str = MATRIX) -> tuple[str, ...]:
    return run.parts("feature_matrix", role, name)


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_aggregates, labels, cohort],
    group_name=PREDICTION_GROUP,
    kinds={"spark", "parquet", "tensorflow"},
    description="Training matrix (cohort as of C, features as of C, label) and inference matrix (cohort and "
    "features as of A), parquet; the training matrix also as TFRecord for tf.data.",
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
    columns = tuple(storage.read_json(*run.parts("feature_aggregates", "columns.json")))
    read = lambda *parts: session.read.parquet(storage.path(*parts))  # noqa: E731
    read(*run.parts("labels", "labels")).createOrReplaceTempView("labels")
    rows = {}
    for role in ("train", "infer"):
        read(*run.parts("cohort", role)).createOrReplaceTempView("cohort")
        read(*run.parts("feature_aggregates", role)).createOrReplaceTempView("features")
        query = matrix_query(columns, with_label=role == "train")
        rows[role] = write_frame(session.sql(query), storage, matrix_parts(run, role))
    storage.write_json(list(columns), *run.parts("feature_matrix", "columns.json"))

    train = pd.read_parquet(storage.path(*matrix_parts(run, "train")))
    with storage.temp_dir() as temp:
        write_tfrecord(train, temp / TFRECORD, list(columns))
        storage.install(temp / TFRECORD, *matrix_parts(run, "train", TFRECORD))
    positives = int(train["label"].sum())
    active = pd.read_parquet(storage.path(*matrix_parts(run, "infer")), columns=["active_last_hour"])
    return dg.MaterializeResult(
        metadata={
            "train_rows": rows["train"],
            "positives": positives,
            "positive_rate": float(positives / max(rows["train"], 1)),
            "infer_rows": rows["infer"],
            "active_last_hour": int(active["active_last_hour"].sum()),
            "n_features": len(columns),
            "path": dg.MetadataValue.path(storage.path(*run.parts("feature_matrix"))),
            **run.describe(),
        }
    )
