import os
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from automl_assets.core.schema import EVENT_SCHEMA
from resources.spark import spark_resource
from resources.storage import LocalStorage


@pytest.fixture(scope="session")
def spark():
    """The Spark the suite was started with: the Spark Connect server of scripts/test.sh, else embedded local[*]."""
    from automl_assets.core.spark_jobs import prepare

    return prepare(spark_resource(remote=os.environ.get("AUTOML_SPARK_REMOTE") or None).spark_session)


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
