"""Scores: calibrated probabilities per user from the newest promoted model trained at or before the hour, written
per partition and merged into a queryable latest-score-per-user table."""

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from automl_assets import checks
from automl_assets.calibrator import calibrator
from automl_assets.core import layout
from automl_assets.core.calibration import Calibrator
from automl_assets.feature_matrix import feature_matrix, matrix_for_model, matrix_parts
from automl_assets.model import job_name, raw_scores
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import (
    INFER,
    SCOPE_FILE,
    SCOPE_TAG,
    PredictionRun,
    calibrator_parts,
    model_in_force,
    model_version,
    newest_model,
    prediction_run,
    recorded_scope,
    scoring_scope,
)
from automl_assets.taxonomy import PREDICTION_GROUP, TAXONOMY_FILE
from resources.sagemaker import EndpointUnavailable, LocalSageMaker
from resources.engine import EngineResource
from resources.storage import LocalStorage

SCORE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("prediction", pa.string()),
        ("score", pa.float64()),
        ("percentile", pa.float64()),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
    ]
)


# The latest-score table is hive-partitioned by prediction (scores_latest/prediction=NAME/): the folder names the
# prediction, so the file does not repeat it, and any parquet reader reads the whole folder as one table.
LATEST_SCHEMA = pa.schema([field for field in SCORE_SCHEMA if field.name != "prediction"])


def percentiles(scores: np.ndarray, reference: list[float]) -> np.ndarray:
    """Share (0-100) of the reference population (held-out users at training time) scoring at or below each score;
    the same yardstick for hourly and daily runs, whatever subset a run scores."""
    return 100.0 * np.searchsorted(np.asarray(reference), scores, side="right") / len(reference)


def merge_latest(storage, prediction: str, new: pd.DataFrame) -> int:
    """Keep each user's most recent score; a re-run of the same hour replaces its own rows. Arrow kernels and no
    sort (rows stay in the order they were scored): an hourly run rewrites a table of every user ever scored. Runs
    of one prediction take turns, or two at once (a manual run during the hourly one) could drop one's update."""
    parts = layout.latest_scores(prediction)
    fresh = pa.Table.from_pandas(new.drop_duplicates("user_id", keep="last")[LATEST_SCHEMA.names], schema=LATEST_SCHEMA, preserve_index=False)
    with storage.exclusive(*parts):
        merged = fresh
        if storage.exists(*parts):
            stored = storage.read_table(*parts).select(LATEST_SCHEMA.names).cast(LATEST_SCHEMA)
            rescored = pc.is_in(stored["user_id"], value_set=fresh["user_id"])
            # A re-run of an older hour must not replace a user's later score.
            overlap = stored.filter(rescored).select(["user_id", "scored_at"]).join(
                fresh.select(["user_id", "scored_at"]), "user_id", right_suffix="_now"
            )
            keep_stored = overlap.filter(pc.greater(overlap["scored_at"], overlap["scored_at_now"]))["user_id"]
            stored = stored.filter(pc.or_(pc.invert(rescored), pc.is_in(stored["user_id"], value_set=keep_stored)))
            merged = pa.concat_tables([stored, fresh.filter(pc.invert(pc.is_in(fresh["user_id"], value_set=keep_stored)))])
        storage.write_table(merged, *parts)
        return merged.num_rows


def endpoint_name(prediction: str) -> str:
    return "automl-" + prediction.replace("_", "-")  # SageMaker endpoint names allow letters, digits and hyphens


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[calibrator, feature_matrix],
    group_name=PREDICTION_GROUP,
    kinds={"sagemaker", "parquet"},
    check_specs=[checks.SCORES_COMPLETE],
    description="user_id, prediction, score, percentile, model_version, scored_at from the newest promoted model "
    "trained at or before the hour: hourly for users active in the hour, daily (hour ending at midnight UTC) for the "
    "whole cohort. The run tag automl/scope (auto, active, cohort) overrides.",
)
def scores(
    context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource, sagemaker: LocalSageMaker
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    missing = [name for name, parts in upstream_outputs(run).items() if not storage.exists(*parts)]
    if missing:
        raise dg.Failure(
            f"{' and '.join(missing)} of {run.prediction} at {run.hour.isoformat()} are not materialised: select the "
            f"whole `{PREDICTION_GROUP}` group for this partition (or launch scoring_job) instead of `scores` alone."
        )
    trained_at = model_in_force(storage, run.prediction, run.hour)
    if trained_at is None:
        raise dg.Failure(
            f"no promoted model of {run.prediction}'s current target (outcome, horizon, offset) was trained at or "
            f"before {run.hour.isoformat()}; materialise `model` and `calibrator` for this or an earlier hour first."
        )
    version = model_version(run.prediction, trained_at)
    stored = storage.read_json(*calibrator_parts(run.prediction, trained_at))
    scope = scoring_scope(context, run)
    built_for = recorded_scope(storage, run.prediction, run.hour)
    if scope == "cohort" and built_for == "active":
        raise dg.Failure(
            f"the cohort and feature matrix of {run.prediction} at {run.hour.isoformat()} hold only the users active "
            f"in the hour: materialise the `{PREDICTION_GROUP}` group from `cohort` with the run tag {SCOPE_TAG}=cohort."
        )
    matrix_dir = matrix_for_model(
        engine, storage, run, INFER, run.times.as_of, trained_at, run.parts("scores", "matrix"), context.log.warning
    )
    # Only the prediction's newest model is served warm: a run rescoring an older hour with the model in force then
    # (late events after a retrain) is a batch transform, so it neither redeploys the prediction's one endpoint with
    # the older model nor stops it under the hourly runs calling it.
    hourly_endpoint = (
        scope == "active"
        and sagemaker.scores_hourly_through_endpoint(context.run.tags)
        and trained_at == newest_model(storage, run.prediction)
    )
    endpoint = endpoint_name(run.prediction) if hourly_endpoint else None
    matrix = pd.read_parquet(matrix_dir, columns=None if endpoint else ["user_id", "active_last_hour"])
    if scope == built_for:  # the cohort's users, every one of whom must be scored
        expected = pd.read_parquet(storage.path(*run.parts("cohort", *INFER)), columns=["user_id"])["user_id"]
    else:  # the users active in the hour, out of a matrix built for the whole cohort
        matrix = matrix[matrix["active_last_hour"] == 1]
        expected = matrix["user_id"]
    model_dir = storage.path(*layout.prediction_asset(run.prediction, "model", trained_at, "model"))
    transform = job_name(run, "transform")
    scored_by, fallback = f"endpoint {endpoint}" if endpoint else "batch transform", {}
    try:
        raw = raw_scores(sagemaker, model_dir, matrix_dir, matrix, endpoint, transform, context.log.info)
    except EndpointUnavailable as error:
        # The endpoint only saves time: one that does not come up, or that a retrain promoted meanwhile replaced under
        # this run, must not leave the hour unscored while its model is on disk.
        context.log.warning(f"{error}; scoring this run by a batch transform instead")
        scored_by, fallback = f"batch transform (endpoint {endpoint} unavailable)", {"endpoint_error": str(error)}
    if fallback:  # outside the handler: a transform that fails too reports its own error alone
        raw = raw_scores(sagemaker, model_dir, matrix_dir, matrix, None, transform, context.log.info)
    score = Calibrator.from_dict(stored["calibrator"]).predict(raw)
    result = pd.DataFrame(
        {
            "user_id": matrix["user_id"].to_numpy(),
            "prediction": run.prediction,
            "score": score,
            "percentile": percentiles(score, stored["reference_quantiles"]),
            "model_version": version,
            "scored_at": pd.Timestamp(run.times.as_of),
        }
    )
    storage.write_table(pa.Table.from_pandas(result, schema=SCORE_SCHEMA, preserve_index=False), *run.parts("scores", "scores.parquet"))
    complete = checks.scores_complete(expected, result)
    if complete.passed:
        latest_rows = merge_latest(storage, run.prediction, result)
    else:  # the check blocks the run; the scores users read keep their previous values
        context.log.error(f"not published to scores_latest: {complete.description}")
        latest_rows = 0
    top = result.nlargest(10, "score")
    return dg.MaterializeResult(
        metadata={
            "scope": scope,
            "scored_by": scored_by,
            **fallback,
            "users_scored": len(result),
            "model_version": version,
            "mean_score": float(score.mean()) if len(score) else 0.0,
            "top_users": dg.MetadataValue.md(
                "| user | score | percentile |\n|---|---|---|\n"
                + "\n".join(f"| {r.user_id} | {r.score:.4f} | {r.percentile:.1f} |" for r in top.itertuples())
            ),
            "latest_table_users": latest_rows,
            "latest_table": dg.MetadataValue.path(storage.path(*layout.latest_scores(run.prediction))),
            **run.describe(),
        },
        check_results=[complete],
    )


def upstream_outputs(run: PredictionRun) -> dict[str, tuple[str, ...]]:
    """What scoring reads of its own partition, by asset."""
    return {
        "taxonomy": run.parts("taxonomy", TAXONOMY_FILE),
        "cohort": run.parts("cohort", SCOPE_FILE),
        "feature_matrix": matrix_parts(run, *INFER),
    }
