"""Partitions: events and rollups by hour; every prediction asset by prediction (dynamic) x hour."""

from collections.abc import Iterable
from datetime import datetime, timedelta

import dagster as dg

from automl_assets.core.timewin import hour_from_key, hour_key, hour_ranges, last_ended_hour

# The first hour the store can hold. Earlier data is rejected by the hourly assets' partition range.
FIRST_HOUR = "2025-01-01-00:00"
PREDICTION = "prediction"

hourly_partitions = dg.HourlyPartitionsDefinition(start_date=FIRST_HOUR)
prediction_partitions = dg.DynamicPartitionsDefinition(name=PREDICTION)
prediction_hour_partitions = dg.MultiPartitionsDefinition({"hour": hourly_partitions, PREDICTION: prediction_partitions})


def ingestible_hours(hours: Iterable[datetime], now: datetime) -> set[datetime]:
    """The hours of staged events an ingest run may cover: partitions, and over. An event dated before the first
    partition (epoch 0, say) would fail the whole run; one in an hour still under way is merged by that hour's
    scheduled ingest (both stay staged)."""
    return {hour for hour in hours if hour_from_key(FIRST_HOUR) <= hour <= last_ended_hour(now)}


# Staged hours this far apart are ingested by separate runs: a run rebuilds every hour of its range, and one offline
# event from weeks ago must not have the weeks between rolled up again.
INGEST_RUN_GAP = timedelta(days=1)


def ingest_ranges(hours: Iterable[datetime], now: datetime) -> list[tuple[datetime, datetime]]:
    """The [start, end) ranges of ingest runs for new files' hours: the ingestible ones, a run per cluster."""
    return hour_ranges(ingestible_hours(hours, now), split_at=INGEST_RUN_GAP)


def prediction_hour_key(prediction: str, hour_start: datetime) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"hour": hour_key(hour_start), PREDICTION: prediction})


def prediction_and_hour(context: dg.AssetExecutionContext) -> tuple[str, datetime]:
    """The (prediction, hour start) of a prediction-asset run, with a clear error for a malformed launch."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):
        raise dg.Failure(
            f"partition key {key!r} is not a prediction x hour key; launch from the UI or pass the tags "
            "dagster/partition/hour and dagster/partition/prediction as well as dagster/partition."
        )
    dims = key.keys_by_dimension
    return dims[PREDICTION], hour_from_key(dims["hour"])


def hour_range(context: dg.AssetExecutionContext) -> tuple[datetime, datetime]:
    """[start, end) of the hours a run of an hourly asset covers: one hour, or a backfill's whole range."""
    window = context.partition_time_window
    return window.start, window.end
