"""Feature matrix: cohort x features (x label for training), as parquet and, for training, a TFRecord file that
`tf.data` streams. Training and inference rows come from the same feature definitions."""

from datetime import datetime

import dagster as dg
import pandas as pd

from automl_assets import checks
from automl_assets.cohort import cohort
from automl_assets.core.feature_sql import matrix_query
from automl_assets.core.tfrecord import write_tfrecord
from automl_assets.core.timewin import hour_from_token
from automl_assets.features import feature_aggregates
from automl_assets.labels import labels
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import PredictionRun, prediction_run, trains_in_this_run
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.engine import EngineResource
from resources.storage import LocalStorage

MATRIX = "matrix.parquet"
TFRECORD = "matrix.tfrecord"


def matrix_parts(run: PredictionRun, role: str, name: str = MATRIX) -> tuple[str, ...]:
    return run.parts("feature_matrix", role, name)


def matrix_sql(sql, cohort_path: str, columns, labels_path: str | None = None) -> str:
    """Cohort users left-joined to their features (view `features`, registered by the caller) and labels: the one
    join behind every matrix."""
    sql.register_parquet("cohort", cohort_path)
    if labels_path is not None:
        sql.register_parquet("labels", labels_path)
    return matrix_query(tuple(columns), with_label=labels_path is not None)


def history_start(storage) -> datetime | None:
    hours = storage.list_dir("events")
    return hour_from_token(hours[0].removeprefix("hour=")) if hours else None


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_aggregates, labels, cohort],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet", "tensorflow"},
    check_specs=[checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE],
    description="Training matrix (cohort as of C, features as of C, label; training runs only) and inference "
    "matrix (cohort and features as of A), parquet; the training matrix also as TFRecord for tf.data.",
)
def feature_matrix(
    context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    if not run.spec.outcome.is_classification:
        raise dg.Failure(
            f"{run.prediction} asks for a regression target (outcome.sum); only event outcomes (classification) "
            "are supported so far. Use `outcome: {event: ...}`."
        )
    sql = engine.engine()
    columns = storage.read_json(*run.parts("feature_aggregates", "columns.json"))
    path = lambda *name: storage.path(*run.parts(*name))  # noqa: E731
    sql.register_parquet("features", path("feature_aggregates", "infer"))
    infer_rows = sql.write(matrix_sql(sql, path("cohort", "infer"), columns), storage, matrix_parts(run, "infer"))
    metadata = {"infer_rows": infer_rows, "n_features": len(columns), **run.describe()}
    if not trains_in_this_run(context):
        reason = "This run only scores: no training matrix was built."
        return dg.MaterializeResult(
            metadata=metadata, check_results=[checks.skipped(spec, reason) for spec in (checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE)]
        )

    sql.register_parquet("features", path("feature_aggregates", "train"))
    train_query = matrix_sql(sql, path("cohort", "train"), columns, labels_path=path("labels", "labels"))
    train_rows = sql.write(train_query, storage, matrix_parts(run, "train"))
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
