"""Calibrator: maps the chosen model's raw scores to probabilities, fitted on held-out users of the most recent
label window; isotonic where it has support, Platt scaling beyond, outputs bounded away from 0 and 1."""

import dagster as dg
import numpy as np
import pandas as pd

from automl_assets.core.calibration import fit_calibrator, to_prior
from automl_assets.core.metrics import reliability_table, summarise
from automl_assets.core.splits import user_fraction
from automl_assets.model import model
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import calibrator_parts, prediction_run
from automl_assets.taxonomy import PREDICTION_GROUP
from resources.storage import LocalStorage

REFERENCE_QUANTILES = 1001  # the score distribution percentiles are read against
CALIBRATION_SEED = 1  # differs from the training split's seed so the halves are independent of it


def reliability_markdown(label: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray) -> str:
    """Predicted vs observed rate per score decile, before and after calibration (of users the calibration was not
    fitted on), with bars to eyeball the gap."""
    before = reliability_table(label, uncalibrated)
    after = reliability_table(label, calibrated)
    bar = lambda v: "█" * int(round(v * 40))  # noqa: E731
    lines = ["| decile | model mean | calibrated mean | observed | observed rate |", "|---|---|---|---|---|"]
    for (_, b), (_, a) in zip(before.iterrows(), after.iterrows()):
        lines.append(f"| {int(a['bin']) + 1} | {b['mean_pred']:.3f} | {a['mean_pred']:.3f} | {a['mean_obs']:.3f} | {bar(a['mean_obs'])} |")
    return "\n".join(lines)


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[model],
    group_name=PREDICTION_GROUP,
    kinds={"scikitlearn", "json"},
    description="Isotonic calibration blended with Platt scaling where the isotonic fit has little support, fitted "
    "on the validation users; before/after metrics are cross-fitted, so no user is scored by a fit that saw them.",
)
def calibrator(context: dg.AssetExecutionContext, storage: LocalStorage) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    held_out = pd.read_parquet(storage.path(*run.parts("model", "output", "validation_predictions.parquet")))
    raw, label = held_out["raw_score"].to_numpy(float), held_out["label"].to_numpy(int)
    # Honest before/after numbers: cross-fitting on two halves of the held-out users, so every user's calibrated
    # score comes from a fit that did not see them.
    half = user_fraction(held_out["user_id"], CALIBRATION_SEED) < 0.5
    crossed = np.empty_like(raw)
    try:
        for fit_part in (half, ~half):
            crossed[~fit_part] = fit_calibrator(raw[fit_part], label[fit_part]).predict(raw[~fit_part])
        final = fit_calibrator(raw, label)
    except ValueError as error:
        raise dg.Failure(f"cannot calibrate {run.prediction}: {error}. Materialise a later hour or widen the cohort.") from None
    # "Before" is the model's own probability (its raw score at the training prior), as the model asset reports it;
    # the raw score itself is learnt under balanced classes, and against it any calibrator would look good.
    train_positive_rate = storage.read_json(*run.parts("model", "output", "metrics.json"))["train_positive_rate"]
    uncalibrated = to_prior(raw, train_positive_rate)
    before, after = summarise(label, uncalibrated), summarise(label, crossed)
    calibrated = final.predict(raw)
    reference = np.quantile(calibrated, np.linspace(0, 1, REFERENCE_QUANTILES)).tolist()
    storage.write_json(
        {"calibrator": final.to_dict(), "before": before, "after": after, "reference_quantiles": reference},
        *calibrator_parts(run.prediction, run.hour),
    )
    return dg.MaterializeResult(
        metadata={
            "ece_before": before["ece"],
            "ece_after": after["ece"],
            "log_loss_before": before["log_loss"],
            "log_loss_after": after["log_loss"],
            "brier_before": before["brier"],
            "brier_after": after["brier"],
            "auc": before["auc"],
            "held_out_users": before["n"],
            "reliability": dg.MetadataValue.md(reliability_markdown(label, uncalibrated, crossed)),  # cross-fitted, as `after`
            **run.describe(),
        }
    )
