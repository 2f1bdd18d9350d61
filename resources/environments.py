"""The one place that chooses resources by environment (AUTOML_ENV)."""

import os

from resources.sagemaker import LocalSageMaker
from resources.spark import spark_resource
from resources.spec_folder import SpecFolder
from resources.storage import LocalStorage

def resources_for_env(name: str | None = None) -> dict:
    """`local` (the default): a local store folder, embedded Spark (or the cluster named by AUTOML_SPARK_MASTER /
    AUTOML_SPARK_REMOTE) and SageMaker's entry script run locally. Nothing connects until a resource is used."""
    name = name or os.environ.get("AUTOML_ENV", "local")
    if name != "local":
        raise ValueError(
            f"AUTOML_ENV={name!r} is not an environment of this project; use 'local' (S3 storage and SageMaker on AWS "
            "are not implemented yet, see docs/status.md)."
        )
    return {
        "storage": LocalStorage(),
        "spark": spark_resource(
            master=os.environ.get("AUTOML_SPARK_MASTER") or None, remote=os.environ.get("AUTOML_SPARK_REMOTE") or None
        ),
        "sagemaker": LocalSageMaker(work_root=os.environ.get("AUTOML_SAGEMAKER_ROOT", "")),
        "spec_folder": SpecFolder(path=os.environ.get("AUTOML_SPECS_DIR") or "predictions"),
    }
