import os
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from automl_assets.core import layout
from automl_assets.core.engines import DuckDBEngine, SparkEngine

from automl_assets.core.schema import EVENT_SCHEMA
from automl_assets.predictions import TARGET_FILE, stored_spec, target_of
from automl_assets.runs import load_project_env
from resources.environments import ENGINES
from resources.engine import SparkEngineResource
from resources.spark import spark_config
from resources.storage import LocalStorage

load_project_env()  # the suite runs with the project's Dagster settings, as `dg dev` and `automl` do


@pytest.fixture(scope="session")
def spark_session():
    """The Spark the suite was started with: the Spark Connect server of scripts/test.sh, else embedded local[*]."""
    return SparkEngineResource(spark_config=spark_config(remote=os.environ.get("AUTOML_SPARK_REMOTE") or None)).spark_session


@pytest.fixture(params=ENGINES)
def engine(request):
    """Each engine in turn: the same definitions must give the same answers on both."""
    if request.param == "spark":
        return SparkEngine(request.getfixturevalue("spark_session"))
    return DuckDBEngine(duckdb.connect())


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(root=str(tmp_path / "store"))


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def events_table(rows: list[dict]) -> pa.Table:
    """Canonical events from short dicts (user_id, event_type, event_time and optional properties)."""
    filled = [
        {
            "user_id": r["user_id"],
            "event_type": r["event_type"],
            "event_time": r["event_time"],
            "insert_id": r.get("insert_id", f"{r['user_id']}-{r['event_type']}-{r['event_time'].isoformat()}"),
            "event_properties": list(r.get("event_properties", {}).items()),
            "user_properties": list(r.get("user_properties", {}).items()),
            "revenue": r.get("revenue"),
        }
        for r in rows
    ]
    return pa.Table.from_pylist(filled, schema=EVENT_SCHEMA)


def fake_model(storage, prediction: str, hour, promoted=True):
    """What the model and calibrator assets leave in the store, reduced to what scheduling reads."""
    storage.write_json(target_of(stored_spec(storage, prediction)), *layout.prediction_asset(prediction, "model", hour, TARGET_FILE))
    storage.write_json({"promoted": promoted, "normalised_log_loss": 0.8}, *layout.prediction_asset(prediction, "model", hour, "promotion.json"))
    storage.write_json({"reference_quantiles": list(np.linspace(0.01, 0.9, 101))}, *layout.prediction_asset(prediction, "calibrator", hour, "calibrator.json"))
