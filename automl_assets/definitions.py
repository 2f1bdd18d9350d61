"""The code location: every asset, check, job, schedule, sensor and resource is assembled here."""

import dagster as dg

from automl_assets import calibrator, cohort, events, feature_matrix, features, labels, model, scores, taxonomy
from jobs import event_store_job, prediction_job, scoring_job
from resources.environments import resources_for_env
from schedules import schedules, sensors

ASSET_MODULES = [events, taxonomy, features, labels, cohort, feature_matrix, model, calibrator, scores]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    jobs=[event_store_job, prediction_job, scoring_job],
    schedules=schedules,
    sensors=sensors,
    resources=resources_for_env(),
    # One process per run: the engine (a DuckDB connection or a Spark session) starts once per run, steps share it.
    executor=dg.in_process_executor,
)
