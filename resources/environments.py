"""The one place that chooses resources by environment (AUTOML_ENV) and engine (AUTOML_ENGINE)."""

import os

from resources.engine import DuckDBEngineResource, EngineResource, SparkEngineResource
from resources.sagemaker import HourlyEndpoint, LocalSageMaker
from resources.spark import spark_config
from resources.spec_folder import SpecFolder
from resources.storage import LocalStorage

ENGINES = ("duckdb", "spark")
# AUTOML_HOURLY_ENDPOINT: 1 and 0 as well as the names, since 1 was its only "on" before the automated default.
HOURLY_ENDPOINT_VALUES = {"": HourlyEndpoint.AUTOMATED, "1": HourlyEndpoint.ALWAYS, "0": HourlyEndpoint.NEVER} | {
    choice.value: choice for choice in HourlyEndpoint
}


def engine_resource(name: str | None = None) -> EngineResource:
    """DuckDB embedded unless Spark is asked for by name or by pointing at a Spark master / Spark Connect server."""
    spark_master = os.environ.get("AUTOML_SPARK_MASTER") or None
    spark_remote = os.environ.get("AUTOML_SPARK_REMOTE") or None
    name = name or os.environ.get("AUTOML_ENGINE") or ("spark" if spark_master or spark_remote else "duckdb")
    if name not in ENGINES:
        raise ValueError(f"AUTOML_ENGINE={name!r} is not an engine of this project; use one of {ENGINES}.")
    if name == "spark":
        return SparkEngineResource(spark_config=spark_config(master=spark_master, remote=spark_remote))
    return DuckDBEngineResource()


def hourly_endpoint_from_env() -> HourlyEndpoint:
    value = os.environ.get("AUTOML_HOURLY_ENDPOINT", "").strip().lower()
    if value not in HOURLY_ENDPOINT_VALUES:
        raise ValueError(
            f"AUTOML_HOURLY_ENDPOINT={value!r} is not understood; use automated (the default: runs a schedule or "
            "sensor launches), always (1) or never (0)."
        )
    return HOURLY_ENDPOINT_VALUES[value]


def resources_for_env(name: str | None = None, engine: str | None = None) -> dict:
    """`local` (the default): a local store folder, the SQL engine (DuckDB embedded, or Spark local / a cluster by
    AUTOML_ENGINE, AUTOML_SPARK_MASTER, AUTOML_SPARK_REMOTE) and SageMaker's entry script run locally (hourly runs
    through a warm local endpoint as AUTOML_HOURLY_ENDPOINT says: by default those a schedule or sensor launches).
    Nothing connects until a resource is used."""
    name = name or os.environ.get("AUTOML_ENV", "local")
    if name != "local":
        raise ValueError(
            f"AUTOML_ENV={name!r} is not an environment of this project; use 'local' (S3 storage and SageMaker on AWS "
            "are not implemented yet, see docs/status.md)."
        )
    return {
        "storage": LocalStorage(),
        "engine": engine_resource(engine),
        "sagemaker": LocalSageMaker(
            work_root=os.environ.get("AUTOML_SAGEMAKER_ROOT", ""),
            hourly_endpoint=hourly_endpoint_from_env(),
        ),
        "spec_folder": SpecFolder(path=os.environ.get("AUTOML_SPECS_DIR") or "predictions"),
    }
