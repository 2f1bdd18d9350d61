"""Feature matrix: cohort x features (x label for training), as parquet and, for training, a TFRecord file that
`tf.data` streams. Training and inference rows come from the same feature definitions; the training matrix stacks
the rows of every training snapshot, with a `snapshot` column (weeks back from the newest)."""

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from automl_assets import checks
from automl_assets.cohort import cohort
from automl_assets.core import event_store, layout
from automl_assets.core.feature_sql import Taxonomy, matrix_query, training_matrix_query
from automl_assets.core.tfrecord import write_tfrecord
from automl_assets.core.timewin import hours_between
from automl_assets.features import COLUMNS_FILE, cohort_features_query, feature_aggregates
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
from automl_assets.taxonomy import PREDICTION_GROUP, TAXONOMY_FILE
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


def matrix_for_model(engine: EngineResource, storage, run: PredictionRun, role: tuple[str, ...], cutoff, trained_at,
                     parts: tuple[str, ...], log, users=None) -> str:
    """The folder of the matrix of `role`'s cohort (only `users` of it, when given) as of `cutoff` with the features
    the prediction's model trained at `trained_at` was trained on: the partition's own inference matrix when that is
    it; else written at `parts`, from the partition's feature rows of `role` when the taxonomies agree, or rebuilt
    with the model's taxonomy by the same code when they do not (scoring with a model whose retrain was not
    promoted; the model in force at the promotion gate, on the held-out users)."""
    model_taxonomy = storage.read_json(*layout.prediction_asset(run.prediction, "model", trained_at, TAXONOMY_FILE))["taxonomy"]
    same_taxonomy = model_taxonomy == storage.read_json(*run.parts("taxonomy", TAXONOMY_FILE))["taxonomy"]
    if same_taxonomy and role == INFER and users is None:
        return storage.path(*matrix_parts(run, *INFER))
    sql = engine.engine()
    with storage.temp_dir() as temp:
        cohort_path = storage.path(*run.parts("cohort", *role))
        if users is not None:
            cohort = pq.read_table(cohort_path)
            wanted = pc.is_in(cohort["user_id"], pa.array(users, cohort.schema.field("user_id").type))
            (temp / "cohort").mkdir()  # a folder of parquet files, as the engines register them
            pq.write_table(cohort.filter(wanted), temp / "cohort" / "part-0.parquet")
            cohort_path = str(temp / "cohort")
        if same_taxonomy:
            stored = storage.read_json(*run.parts("feature_aggregates", COLUMNS_FILE))
            sql.register_parquet("features", storage.path(*run.parts("feature_aggregates", *role)))
            columns, absent = stored["columns"], stored["absent"]
        else:
            log(f"the model was trained on another taxonomy than {run.prediction}'s at this hour: rebuilding its features")
            chosen = Taxonomy.from_dict(model_taxonomy)
            sql.register_rollups(storage, hours_between(cutoff - chosen.lookback, cutoff))
            query = cohort_features_query(sql, cohort_path, chosen, cutoff)
            sql.register_query("features", query.sql)
            columns, absent = query.columns, query.absent
        sql.write(matrix_sql(sql, cohort_path, columns, absent), storage, parts)
    return storage.path(*parts)


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
