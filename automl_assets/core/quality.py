"""Data rules behind the asset checks and the drift sensor: pure functions over frames and arrays.

Every threshold is stated here with its reason (docs/automation.md repeats them)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from automl_assets.core.metrics import auc

# At least this many of each class before training: below it, a 20% validation split holds ~20 of the rarer class,
# too few for log-loss to rank candidates or for isotonic calibration to have a single well-supported step.
MIN_POSITIVES = 100
MIN_NEGATIVES = 100
# A feature that alone ranks users this well, or correlates this strongly with the label, is almost surely the
# outcome seen through a window that overlaps the label (leakage): real behavioural signal stays far below both.
LEAKAGE_AUC = 0.99
LEAKAGE_CORRELATION = 0.95
LEAKAGE_SAMPLE_ROWS = 50_000  # single-feature AUCs to about ±0.005, far finer than the 0.99 bar; 1-2 s on any matrix size
# Training stacks weekly snapshots (spec `training_snapshots`) until the training rows reach this many: one snapshot of
# a few thousand users is too small for the models to beat a 3-feature baseline (docs/evaluation.md), while a cohort of
# this size gains little from more rows and would pay for each snapshot in time and memory. A cost bound.
ENOUGH_TRAINING_ROWS = 200_000
# A new model may be at most 5% worse than the model in force in normalised log-loss, both scored on the same held-out
# users, and still be promoted: it has learnt from the newest weeks, which one label window shows only in part, and
# a few hundred held-out positives still leave the two losses a few percent apart by chance.
PROMOTION_MARGIN = 0.05
# Population stability index: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift (the credit-scoring rule of
# thumb). A retrain is requested above 0.25.
PSI_RETRAIN = 0.25
PSI_BINS = 10


@dataclass(frozen=True)
class Leak:
    column: str
    auc: float
    correlation: float

    def describe(self) -> str:
        return f"{self.column} (AUC {self.auc:.3f}, correlation {self.correlation:+.3f})"


def leaking_features(matrix: pd.DataFrame, columns: list[str], seed: int = 0) -> list[Leak]:
    """Features that alone nearly predict the label: AUC (either direction) >= LEAKAGE_AUC or
    |correlation| >= LEAKAGE_CORRELATION."""
    sample = matrix.sample(n=LEAKAGE_SAMPLE_ROWS, random_state=seed) if len(matrix) > LEAKAGE_SAMPLE_ROWS else matrix
    label = sample["label"].to_numpy(float)
    if label.min() == label.max():
        return []
    leaks = []
    for column in columns:
        values = sample[column].to_numpy(float)
        if values.min() == values.max():
            continue
        single_auc = auc(label, values)
        correlation = float(np.corrcoef(values, label)[0, 1])
        strength = max(single_auc, 1 - single_auc)
        if strength >= LEAKAGE_AUC or abs(correlation) >= LEAKAGE_CORRELATION:
            leaks.append(Leak(column, strength, correlation))
    return leaks


def normalised_log_loss(log_loss: float, positive_rate: float) -> float:
    """Log-loss relative to predicting the base rate for everyone: comparable across label windows whose positive
    rates differ (1.0 = no better than the constant)."""
    rate = min(max(positive_rate, 1e-6), 1 - 1e-6)
    constant = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return float(log_loss / constant)


def population_stability_index(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI of `actual` against `expected`, with bins at the quantiles of `expected` (a floor of 1e-4 per bin keeps
    empty bins finite)."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    if len(expected) == 0 or len(actual) == 0:
        return 0.0
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    share = lambda values: np.maximum(np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) / len(values), 1e-4)  # noqa: E731
    e, a = share(expected), share(actual)
    return float(np.sum((a - e) * np.log(a / e)))
