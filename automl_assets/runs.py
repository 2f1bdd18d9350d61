"""Launching the project's jobs through Dagster, as the UI would: one run per hour range or per partition."""

from datetime import datetime
from pathlib import Path

import dagster as dg
import dotenv

from automl_assets.core.timewin import HOUR, hour_key
from automl_assets.partitions import prediction_hour_key
from automl_assets.predictions import SCOPE_TAG

# Runs launched from the command line log warnings and errors only; the UI keeps every event either way.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

# Dagster's tags for a run that covers a partition range (what a single-run backfill launches).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


PROJECT_ENV = Path(__file__).resolve().parents[1] / ".env"


def load_project_env() -> None:
    """The project's Dagster settings for runs launched from Python: `.env` in the working directory, where Dagster's
    own commands read it, then the checkout's (beside pyproject.toml, for `automl` run from another folder) for what
    the first leaves unset. Variables already set are kept; without either file Dagster's defaults apply (range runs
    then plan one event per hour)."""
    for env_file in (Path.cwd() / ".env", PROJECT_ENV):
        dotenv.load_dotenv(env_file, override=False)


def _job(name: str) -> dg.JobDefinition:
    from automl_assets.definitions import defs

    return defs.resolve_job_def(name)


def failure_reasons(result: dg.ExecuteInProcessResult) -> list[str]:
    """Why a run failed, in words one can act on: each failed blocking check's description, and each failed step's
    own error (a dg.Failure's description, else the innermost exception) rather than Dagster's wrapper around it."""
    reasons = [
        f"check {evaluation.check_name} of {evaluation.asset_key.to_user_string()}: {evaluation.description}"
        for evaluation in result.get_asset_check_evaluations()
        if evaluation.blocking and not evaluation.passed
    ]
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data, error = event.step_failure_data, event.step_failure_data.error
        while error.cause:
            error = error.cause
        if error.cls_name == "DagsterAssetCheckFailedError" and reasons:
            continue  # the checks above say why
        described = data.user_failure_data.description if data.user_failure_data else None
        reasons.append(f"step {event.step_key}: {described or error.message.strip()}")
    return reasons or [event.message for event in result.all_events if event.is_run_failure and event.message]


def raise_on_failure(result: dg.ExecuteInProcessResult, what: str) -> dg.ExecuteInProcessResult:
    if not result.success:
        raise RuntimeError(f"{what} failed: {' / '.join(failure_reasons(result))}")
    return result


def run_event_store(instance: dg.DagsterInstance, start: datetime, end: datetime) -> dg.ExecuteInProcessResult:
    """Ingest and roll up every hour in [start, end) in one run."""
    load_project_env()
    tags = {RANGE_START_TAG: hour_key(start), RANGE_END_TAG: hour_key(end - HOUR)}
    result = _job("event_store_job").execute_in_process(
        run_config=QUIET, instance=instance, tags=tags, raise_on_error=False
    )
    return raise_on_failure(result, f"event store run for [{start.isoformat()}, {end.isoformat()})")


def run_prediction(
    instance: dg.DagsterInstance, prediction: str, hour_start: datetime, scope: str = "auto", train: bool = True
) -> dg.ExecuteInProcessResult:
    """The prediction chain for one (hour, prediction) partition: training and scoring, or scoring only."""
    job = _job("prediction_job" if train else "scoring_job")
    result = job.execute_in_process(
        instance=instance,
        partition_key=prediction_hour_key(prediction, hour_start),
        run_config=QUIET,
        tags={SCOPE_TAG: scope},
        raise_on_error=False,
    )
    return raise_on_failure(result, f"{job.name} run for {prediction} at {hour_key(hour_start)}")
