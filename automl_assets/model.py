"""Model: candidates trained without humans by a SageMaker training job (local subprocess by default); the best by
validation log-loss is kept with every candidate's metrics."""

import shutil
from pathlib import Path

import dagster as dg

from automl_assets.core.timewin import hour_token
from automl_assets.feature_matrix import feature_matrix
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import PredictionRun, prediction_run
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.sagemaker import LocalSageMaker
from resources.storage import LocalStorage

VALIDATION_FRACTION = 0.2  # 80/20 split by user
SEED = 0


def model_version(prediction: str, hour) -> str:
    """Names a model by the partition that trained it, so a score row says which training it came from."""
    return f"{prediction}@{hour_token(hour)}"


def job_name(run: PredictionRun, kind: str) -> str:
    # SageMaker job names allow [a-zA-Z0-9-] only.
    return f"{kind}-{run.prediction}-{hour_token(run.hour)}".replace("_", "-").replace("T", "t")


def _copy_into_store(storage, source: Path, parts: tuple[str, ...]) -> None:
    with storage.temp_dir() as temp:
        shutil.copytree(source, temp / "copy")
        storage.install(temp / "copy", *parts)


def metrics_table(candidates: dict[str, dict], chosen: str) -> str:
    rows = [
        f"| {name}{' (chosen)' if name == chosen else ''} | {m['auc']:.4f} | {m['log_loss']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} |"
        for name, m in sorted(candidates.items(), key=lambda item: item[1]["log_loss"])
    ]
    return "| model | AUC | log-loss | Brier | ECE |\n|---|---|---|---|---|\n" + "\n".join(rows)


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[feature_matrix],
    group_name=PREDICTION_GROUP,
    kinds={"sagemaker", "scikitlearn", "tensorflow"},
    description="Logistic regression, gradient boosting and a Keras network trained on 80% of the training users "
    "(class-rebalanced); the one with the best log-loss on the other 20% is kept.",
)
def model(context: dg.AssetExecutionContext, storage: LocalStorage, sagemaker: LocalSageMaker) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    hyperparameters = {
        "models": list(run.spec.models),
        "validation_fraction": VALIDATION_FRACTION,
        "max_training_users": run.spec.max_training_users,
        "seed": SEED,
    }
    train_channel = Path(storage.path(*run.parts("feature_matrix", "train")))
    with sagemaker.train(job_name(run, "train"), {"train": train_channel}, hyperparameters, context.log.info) as job:
        _copy_into_store(storage, job.model_dir, run.parts("model", "model"))
        _copy_into_store(storage, job.output_data_dir, run.parts("model", "output"))
    metrics = storage.read_json(*run.parts("model", "output", "metrics.json"))
    chosen = metrics["chosen"]
    best = metrics["metrics"][chosen]
    return dg.MaterializeResult(
        metadata={
            "model_version": model_version(run.prediction, run.hour),
            "chosen_model": chosen,
            "auc": best["auc"],
            "log_loss": best["log_loss"],
            "brier": best["brier"],
            "ece_uncalibrated": best["ece"],
            "candidates": dg.MetadataValue.md(metrics_table(metrics["metrics"], chosen)),
            "n_train": metrics["n_train"],
            "n_validation": metrics["n_validation"],
            "positives": metrics["positives"],
            "path": dg.MetadataValue.path(storage.path(*run.parts("model"))),
            **run.describe(),
        }
    )
