"""Model: candidates trained without humans by a SageMaker training job (local subprocess by default); the best by
validation log-loss is kept with every candidate's metrics."""

import ctypes
import ctypes.util
import gc
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa

from automl_assets.core import layout
from automl_assets.core.calibration import to_prior
from automl_assets.core.metrics import summarise
from automl_assets.core.timewin import hour_token
from automl_assets.feature_matrix import feature_matrix, matrix_for_model
from automl_assets.partitions import prediction_hour_partitions
from automl_assets import checks
from automl_assets.core import quality
from automl_assets.core.splits import SPLIT_SEED, VALIDATION_FRACTION
from automl_assets.predictions import (
    TARGET_FILE,
    PredictionRun,
    calibrator_parts,
    model_in_force,
    model_version,
    prediction_run,
    promotion_parts,
    snapshot_role,
    stacked_snapshots,
    target_of,
)
from automl_assets.taxonomy import PREDICTION_GROUP, TAXONOMY_FILE
from resources.engine import EngineResource
from resources.sagemaker import LocalSageMaker
from resources.storage import LocalStorage


def job_name(run: PredictionRun, kind: str) -> str:
    # SageMaker job names allow [a-zA-Z0-9-] only.
    return f"{kind}-{run.prediction}-{hour_token(run.hour)}".replace("_", "-").replace("T", "t")


def _copy_into_store(storage, source: Path, parts: tuple[str, ...]) -> None:
    with storage.temp_dir() as temp:
        shutil.copytree(source, temp / "copy")
        storage.install(temp / "copy", *parts)


def return_freed_memory() -> None:
    """Hand back to the OS what earlier steps of this run freed but the allocators kept (Arrow's pool, the C heap):
    the training job is another process, and its peak adds to this one's."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):  # glibc only
        ctypes.CDLL(libc).malloc_trim(0)


def metrics_table(candidates: dict[str, dict], chosen: str) -> str:
    rows = [
        f"| {name}{' (chosen)' if name == chosen else ''} | {m['auc']:.4f} | {m['log_loss']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} |"
        for name, m in sorted(candidates.items(), key=lambda item: item[1]["log_loss"])
    ]
    return "| model | AUC | log-loss | Brier | ECE |\n|---|---|---|---|---|\n" + "\n".join(rows)


def raw_scores(sagemaker: LocalSageMaker, model_dir: str, matrix_dir: str, users: pd.DataFrame, endpoint: str | None,
               job: str, log) -> np.ndarray:
    """Raw scores of `users` (rows of the matrix in `matrix_dir`), in their order: through the warm endpoint named
    `endpoint` (deployed when it is not up; `users` then holds the feature columns), or a batch transform of the
    matrix folder."""
    if users.empty:
        return np.array([], dtype=float)
    if endpoint:
        transformed = sagemaker.invoke(sagemaker.deploy(endpoint, model_dir, log), users)
    else:
        with sagemaker.transform(job, model_dir, matrix_dir, log) as output:
            transformed = pd.read_parquet(output / "scores.parquet")
    return users[["user_id"]].merge(transformed, on="user_id", how="left", validate="one_to_one")["raw_score"].to_numpy(float)


def in_force_on_held_out(storage, engine, sagemaker, run: PredictionRun, trained_at, held_out: pd.DataFrame, log) -> np.ndarray:
    """The probabilities (at its own training prior) that the model trained at `trained_at` gives the new model's
    held-out users as of the newest training cutoff, NaN for a user not in that cohort: their features rebuilt with
    its taxonomy when it differs."""
    newest = stacked_snapshots(storage, run)[0]
    in_force = lambda *name: layout.prediction_asset(run.prediction, "model", trained_at, *name)  # noqa: E731
    gate_matrix = run.parts("model", "gate_matrix")
    try:
        matrix_dir = matrix_for_model(
            engine, storage, run, snapshot_role(newest), newest.cutoff, trained_at, gate_matrix, log, users=held_out["user_id"]
        )
        raw = raw_scores(sagemaker, storage.path(*in_force("model")), matrix_dir, held_out, None, job_name(run, "gate"), log)
    finally:
        storage.remove(*gate_matrix)
    return to_prior(raw, storage.read_json(*in_force("output", "metrics.json"))["train_positive_rate"])


def promotion(storage, engine, sagemaker, run: PredictionRun, metrics: dict, log) -> dict:
    """Promote unless the new model is clearly worse than the model in force, both scored now on the same users: the
    new model's held-out users in the newest label window (what its calibrator fits, the window closest to what
    scores are about), each model's probability at its own training prior, by log-loss. A number the model in force
    recorded on its own, older window is not a fair bar: a lucky window would keep an ageing model in force."""
    new = metrics["chosen_newest_snapshot"]
    positive_rate = new["positives"] / new["n"]
    decision = {"normalised_log_loss": quality.normalised_log_loss(new["log_loss"], positive_rate), "compared_with": None, "promoted": True}
    current_hour = model_in_force(storage, run.prediction, run.hour, before=True)
    if current_hour is None:
        return {**decision, "reason": "the first model of this prediction's target (outcome, horizon, offset)"}
    held_out = pd.read_parquet(storage.path(*run.parts("model", "output", "validation_predictions.parquet")))
    version = model_version(run.prediction, current_hour)
    try:
        probabilities = in_force_on_held_out(storage, engine, sagemaker, run, current_hour, held_out, log)
    except Exception as error:  # noqa: BLE001 (reported in the reason and the log, not swallowed)
        # A model in force that can no longer be scored (a format this version cannot load, files removed) must not
        # stop every retrain that would replace it.
        log(f"the model in force {version} could not be scored on the held-out users: {error}")
        return {**decision, "compared_with": version, "reason": f"the model in force ({version}) could not be scored again: {error}"}
    if np.isnan(probabilities).any():
        raise dg.Failure(
            f"{np.isnan(probabilities).sum()} held-out users of {run.prediction} at {hour_token(run.hour)} are not in its "
            "newest training cohort: re-materialise this partition's cohort, feature_aggregates, feature_matrix and model "
            "together."
        )
    in_force = summarise(held_out["label"], probabilities)
    bar = quality.normalised_log_loss(in_force["log_loss"], positive_rate)
    promoted = decision["normalised_log_loss"] <= bar * (1 + quality.PROMOTION_MARGIN)
    return {
        **decision,
        "compared_with": version,
        "in_force_normalised_log_loss": bar,
        "auc": new["auc"],
        "in_force_auc": in_force["auc"],
        "compared_on_users": new["n"],
        "promoted": promoted,
        "reason": f"normalised log-loss {decision['normalised_log_loss']:.4f} is {'within' if promoted else 'more than'} "
        f"{quality.PROMOTION_MARGIN:.0%} of the model in force's {bar:.4f} ({version}), both on the same {new['n']:,} "
        f"held-out users of the newest label window (AUC {new['auc']:.4f} against {in_force['auc']:.4f})",
    }


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_matrix],
    group_name=PREDICTION_GROUP,
    kinds={"sagemaker", "scikitlearn", "tensorflow"},
    check_specs=[checks.PROMOTION_GATE],
    description="Logistic regression, gradient boosting and a Keras network trained on 80% of the training users "
    "(class-rebalanced), and the means of every two or three of them; the one with the best log-loss on the other "
    "20% is kept, and promoted "
    "unless it is clearly worse than the model in force, scored again on the same held-out users.",
)
def model(
    context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource, sagemaker: LocalSageMaker
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    hyperparameters = {
        "models": list(run.spec.models),
        "validation_fraction": VALIDATION_FRACTION,
        "max_training_users": run.spec.max_training_users,
        "seed": SPLIT_SEED,
    }
    train_channel = Path(storage.path(*run.parts("feature_matrix", "train")))
    if not train_channel.exists():
        raise dg.Failure(
            f"no training matrix for {run.prediction} at {hour_token(run.hour)}: materialise feature_matrix in the "
            "same run as model (a scoring-only run does not build one)."
        )
    return_freed_memory()
    # A retrain of an hour that has a model: that hour is out of force (model_in_force needs its promotion and
    # calibrator) until this run's calibrator is stored, or other runs would pair the new model with the old
    # calibrator, and keep doing so if this run stopped before its calibrator step.
    storage.remove(*promotion_parts(run.prediction, run.hour))
    storage.remove(*calibrator_parts(run.prediction, run.hour))
    with sagemaker.train(job_name(run, "train"), {"train": train_channel}, hyperparameters, context.log.info) as job:
        _copy_into_store(storage, job.model_dir, run.parts("model", "model"))
        _copy_into_store(storage, job.output_data_dir, run.parts("model", "output"))
    # The model keeps the taxonomy it was trained with (scoring runs rebuild exactly these features) and the target
    # it predicts (a spec that changes its outcome, horizon or offset no longer uses it).
    storage.write_json(storage.read_json(*run.parts("taxonomy", TAXONOMY_FILE)), *run.parts("model", TAXONOMY_FILE))
    storage.write_json(target_of(run.spec), *run.parts("model", TARGET_FILE))
    metrics = storage.read_json(*run.parts("model", "output", "metrics.json"))
    decision = promotion(storage, engine, sagemaker, run, metrics, context.log.info)
    storage.write_json(decision, *promotion_parts(run.prediction, run.hour))
    chosen = metrics["chosen"]
    best = metrics["metrics"][chosen]
    return dg.MaterializeResult(
        metadata={
            "model_version": model_version(run.prediction, run.hour),
            "chosen_model": chosen,
            "promoted": decision["promoted"],
            "auc": best["auc"],
            "log_loss": best["log_loss"],
            "normalised_log_loss": decision["normalised_log_loss"],
            **({"in_force_normalised_log_loss": decision["in_force_normalised_log_loss"]} if "in_force_normalised_log_loss" in decision else {}),
            "brier": best["brier"],
            "ece_uncalibrated": best["ece"],
            "candidates": dg.MetadataValue.md(metrics_table(metrics["metrics"], chosen)),
            "n_train": metrics["n_train"],
            "n_validation": metrics["n_validation"],
            "n_calibration": metrics["n_calibration"],
            "validation_rows": "auc, log_loss, brier and the candidates table: every snapshot of the held-out users "
            "(n_validation rows); the promotion gate and the calibrator: their newest snapshot (n_calibration rows)",
            "positives": metrics["positives"],
            "path": dg.MetadataValue.path(storage.path(*run.parts("model"))),
            **run.describe(),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=checks.PROMOTION_GATE.name,
                passed=decision["promoted"],
                severity=dg.AssetCheckSeverity.WARN,
                description=("Promoted: " if decision["promoted"] else "Not promoted, scores keep the model in force: ")
                + decision["reason"]
                + ".",
            )
        ],
    )
