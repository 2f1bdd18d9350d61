"""Asset checks: the data rules that guard training and every publish. Each result carries a sentence a person can
act on; thresholds live in automl_assets/core/quality.py with their reasons."""

import dagster as dg
import pandas as pd

from automl_assets.core import quality

TRAINING_ELIGIBILITY = dg.AssetCheckSpec(
    "training_eligibility",
    asset="feature_matrix",
    blocking=True,
    description=f"At least {quality.MIN_POSITIVES} positives and {quality.MIN_NEGATIVES} negatives, and event "
    "history reaching back over the whole lookback before the training cutoff.",
)
NO_LEAKAGE = dg.AssetCheckSpec(
    "no_label_leakage",
    asset="feature_matrix",
    blocking=True,
    description=f"No feature alone predicts the label (single-feature AUC >= {quality.LEAKAGE_AUC} or "
    f"|correlation| >= {quality.LEAKAGE_CORRELATION}).",
)
PROMOTION_GATE = dg.AssetCheckSpec(
    "promotion_gate",
    asset="model",
    description=f"A new model is promoted unless its normalised validation log-loss is more than "
    f"{quality.PROMOTION_MARGIN:.0%} worse than the model in force; scores keep using the model in force otherwise.",
)
SCORES_COMPLETE = dg.AssetCheckSpec(
    "scores_complete",
    asset="scores",
    blocking=True,
    description="Every user of the scoring set scored exactly once, with a probability strictly between 0 and 1.",
)
LANDING_READABLE = dg.AssetCheckSpec(
    "landing_files_readable",
    asset="events",
    description="Every file under landing/ can be read; one that cannot is named with what to fix, and the other "
    "files are ingested meanwhile.",
)
EVENTS_FRESH = dg.AssetCheckSpec(
    "events_fresh",
    asset="events",
    description="The newest hour in the event store is at most 3 hours older than the newest hour this run covered.",
)


def sentence(problems: list[str]) -> str:
    text = "; ".join(problems)
    return text[:1].upper() + text[1:] + "."


def skipped(spec: dg.AssetCheckSpec, reason: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=spec.name, passed=True, description=reason)


def training_eligibility(train: pd.DataFrame, history_start, needed_from) -> dg.AssetCheckResult:
    # Counted in the newest snapshot: the calibrator and the promotion gate are fitted on its held-out users alone,
    # so older stacked snapshots' positives do not make up for a newest label window without them.
    newest = train[train["snapshot"] == 0]
    positives = int(newest["label"].sum())
    negatives = len(newest) - positives
    problems = []
    if positives < quality.MIN_POSITIVES or negatives < quality.MIN_NEGATIVES:
        problems.append(
            f"the newest training snapshot ({len(newest)} users, the label window calibration and the promotion gate "
            f"use) has {positives} positives and {negatives} negatives; at least {quality.MIN_POSITIVES} of each are "
            "needed ("
            + ("no positive at all: check the outcome's event name and filter against the events' names, or " if not positives else "")
            + "widen the cohort or the horizon, or wait for more data)"
        )
    if history_start is None or history_start > needed_from:
        problems.append(
            f"the event store starts at {history_start.isoformat() if history_start else 'nothing'} but the lookback "
            f"needs events from {needed_from.isoformat()} (ingest older data or lower lookback_weeks)"
        )
    return dg.AssetCheckResult(
        check_name=TRAINING_ELIGIBILITY.name,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=sentence(problems) if problems else "Enough positives, negatives and history to train.",
        metadata={"newest_snapshot_positives": positives, "newest_snapshot_negatives": negatives, "training_rows": len(train)},
    )


def no_leakage(train: pd.DataFrame, columns: list[str]) -> dg.AssetCheckResult:
    leaks = quality.leaking_features(train, columns)
    return dg.AssetCheckResult(
        check_name=NO_LEAKAGE.name,
        passed=not leaks,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            "These features alone nearly predict the label, which means they see the outcome: "
            + "; ".join(leak.describe() for leak in leaks)
            + ". Training is blocked; check the outcome event against the selected events and the offset."
        )
        if leaks
        else "No feature alone predicts the label.",
        metadata={"leaking_features": dg.MetadataValue.json([leak.column for leak in leaks])},
    )


def scores_complete(expected_users: pd.Series, scored: pd.DataFrame) -> dg.AssetCheckResult:
    missing = set(expected_users) - set(scored["user_id"])
    duplicated = int(scored["user_id"].duplicated().sum())
    out_of_range = int((~scored["score"].between(0, 1, inclusive="neither")).sum())
    problems = []
    if missing:
        problems.append(f"{len(missing)} users of the scoring set have no score (e.g. {sorted(missing)[:3]})")
    if duplicated:
        problems.append(f"{duplicated} users are scored more than once")
    if out_of_range:
        problems.append(f"{out_of_range} scores are not strictly between 0 and 1")
    return dg.AssetCheckResult(
        check_name=SCORES_COMPLETE.name,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description=sentence(problems) if problems else f"All {len(scored)} users scored exactly once.",
    )
