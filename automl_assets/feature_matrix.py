"""Feature matrix: cohort x features (x label for training), as parquet and, for training, a TFRecord file that
`tf.data` streams. Training and inference rows come from the same feature definitions; the training matrix stacks
the rows of every training snapshot, with a `snapshot` column (weeks back from the newest)."""

import dagster as dg
import pandas as pd

from automl_assets import checks
from automl_assets.cohort import cohort
from automl_assets.core import event_store
from automl_assets.core.feature_sql import matrix_query, training_matrix_query
from automl_assets.core.tfrecord import write_tfrecord
from automl_assets.features import COLUMNS_FILE, feature_aggregates
from automl_assets.labels import labels
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import (
    INFER,
    PredictionRun,
    prediction_run,
    snapshot_role,
    stacked_snapshots,
    trains_in_this_run,
)
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.engine import EngineResource
from resources.storage import LocalStorage

MATRIX = "matrix.parquet"
TFRECORD = "matrix.tfrecord"


def matrix_parts(run: PredictionRun, role: str, name: str = MATRIX) -> tuple[str, ...]:
    return run.parts("feature_matrix", role, name)


def matrix_sql(sql, cohort_path: str, columns, absent: dict[str, float]) -> str:
    """Cohort users left-joined to their features (view `features`, registered by the caller): the inference join."""
    sql.register_parquet("cohort", cohort_path)
    return matrix_query(tuple(columns), absent)


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_aggregates, labels, cohort],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet", "tensorflow"},
    check_specs=[checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE],
    description="Training matrix (per stacked snapshot: cohort and features as of its cutoff, its label; training "
    "runs only) and inference matrix (cohort and features as of A), parquet; the training matrix also as TFRecord "
    "for tf.data.",
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
    stored = storage.read_json(*run.parts("feature_aggregates", COLUMNS_FILE))
    columns, absent = stored["columns"], stored["absent"]
    path = lambda *name: storage.path(*run.parts(*name))  # noqa: E731
    sql.register_parquet("features", path("feature_aggregates", *INFER))
    infer_rows = sql.write(matrix_sql(sql, path("cohort", *INFER), columns, absent), storage, matrix_parts(run, *INFER))
    metadata = {"infer_rows": infer_rows, "n_features": len(columns), **run.describe()}
    if not trains_in_this_run(context):
        reason = "This run only scores: no training matrix was built."
        return dg.MaterializeResult(
            metadata=metadata, check_results=[checks.skipped(spec, reason) for spec in (checks.TRAINING_ELIGIBILITY, checks.NO_LEAKAGE)]
        )

    snapshots = stacked_snapshots(storage, run)
    for snapshot in snapshots:
        k, role = snapshot.weeks_back, snapshot_role(snapshot)
        sql.register_parquet(f"cohort_{k}", path("cohort", *role))
        sql.register_parquet(f"features_{k}", path("feature_aggregates", *role))
        sql.register_parquet(f"labels_{k}", path("labels", *role))
    train_query = training_matrix_query(tuple(columns), absent, len(snapshots))
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
            "training_snapshots": len(snapshots),
            "positives": positives,
            "positive_rate": float(positives / max(train_rows, 1)),
            "path": dg.MetadataValue.path(storage.path(*run.parts("feature_matrix"))),
        },
        check_results=[
            checks.training_eligibility(train, event_store.oldest_stored_hour(storage), run.times.train_lookback_start),
            checks.no_leakage(train, columns),
        ],
    )
