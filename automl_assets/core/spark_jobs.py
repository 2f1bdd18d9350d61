"""Spark plumbing for the Spark engine (automl_assets/core/engines.py): schemas of the lake, reading hour ranges into
DataFrames, the rollup SQL in Spark's dialect, and writing results atomically into the store."""

from datetime import datetime

import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from automl_assets.core import layout
from automl_assets.core.feature_sql import bounded_value_sql
from automl_assets.core.timewin import epoch_hour, hours_by_day

_PROPERTIES = T.MapType(T.StringType(), T.StringType())
EVENTS = T.StructType(
    [
        T.StructField("user_id", T.StringType()),
        T.StructField("event_type", T.StringType()),
        T.StructField("event_time", T.TimestampType()),
        T.StructField("insert_id", T.StringType()),
        T.StructField("event_properties", _PROPERTIES),
        T.StructField("user_properties", _PROPERTIES),
        T.StructField("revenue", T.DoubleType()),
    ]
)
_ARROW_TYPES = {"string": pa.string(), "long": pa.int64(), "double": pa.float64(), "timestamp": pa.timestamp("us", tz="UTC")}
ROLLUPS = {
    "counts": T.StructType(
        [
            T.StructField("user_id", T.StringType()),
            T.StructField("event_type", T.StringType()),
            T.StructField("hour_idx", T.LongType()),
            T.StructField("n", T.LongType()),
            T.StructField("revenue", T.DoubleType()),
        ]
    ),
    "props": T.StructType(
        [
            T.StructField("user_id", T.StringType()),
            T.StructField("event_type", T.StringType()),
            T.StructField("prop_key", T.StringType()),
            T.StructField("prop_value", T.StringType()),
            T.StructField("hour_idx", T.LongType()),
            T.StructField("n", T.LongType()),
        ]
    ),
    "users": T.StructType(
        [
            T.StructField("user_id", T.StringType()),
            T.StructField("prop_key", T.StringType()),
            T.StructField("hour_idx", T.LongType()),
            T.StructField("first_value", T.StringType()),
            T.StructField("first_time", T.TimestampType()),
            T.StructField("last_value", T.StringType()),
            T.StructField("last_time", T.TimestampType()),
        ]
    ),
}
ROLLUP_ARROW = {kind: pa.schema([pa.field(f.name, _ARROW_TYPES[f.dataType.typeName()]) for f in schema]) for kind, schema in ROLLUPS.items()}
ROLLUP_FILE = "part-0.parquet"

HOUR_IDX_SQL = "CAST(FLOOR(unix_micros(event_time) / 3600000000) AS BIGINT)"
# Each rollup kind's definition over a view `{events}` of events with their hour_idx: what the hourly_rollups asset
# stores, and what the rollup views compute on the fly for hours not rolled up yet.
ROLLUP_SQL = {
    "counts": "SELECT user_id, event_type, hour_idx, COUNT(*) AS n, SUM(revenue) AS revenue "
    "FROM {events} GROUP BY user_id, event_type, hour_idx",
    "props": "SELECT user_id, event_type, prop_key, prop_value, hour_idx, COUNT(*) AS n FROM (SELECT user_id, event_type, "
    f"p.prop_key, {bounded_value_sql('p.prop_value')} AS prop_value, hour_idx "
    "FROM {events} LATERAL VIEW explode(event_properties) p AS prop_key, prop_value) e "
    "GROUP BY user_id, event_type, prop_key, prop_value, hour_idx",
    # Ties at the same microsecond are broken by insert_id, so first/last values never depend on file order.
    "users": "SELECT user_id, u.prop_key, hour_idx, "
    "min_by(u.prop_value, struct(event_time, insert_id)) AS first_value, min(event_time) AS first_time, "
    "max_by(u.prop_value, struct(event_time, insert_id)) AS last_value, max(event_time) AS last_time "
    "FROM {events} LATERAL VIEW explode(user_properties) u AS prop_key, prop_value "
    "GROUP BY user_id, u.prop_key, hour_idx",
}


def prepare(spark: SparkSession) -> SparkSession:
    # Set on every use, not only at build time: a Spark Connect session may have been created elsewhere.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    return spark


def existing_hour_paths(storage, root: tuple[str, ...], hours: list[datetime], leaf: tuple[str, ...]) -> list[str]:
    present = set(storage.list_dir(*root))
    return [storage.path(*root, name, *leaf) for name in map(layout.hour_folder, hours) if name in present]


def read_events(spark: SparkSession, storage, hours: list[datetime]) -> DataFrame:
    paths = existing_hour_paths(storage, layout.events_root(), hours, ("events.parquet",))
    return spark.read.schema(EVENTS).parquet(*paths) if paths else spark.createDataFrame([], EVENTS)


def rollup_paths(storage, kind: str, hours: list[datetime]) -> list[str]:
    """The stored rollup files holding `hours`: the day file of each day that has one (it stands for its whole day),
    the hourly files of the other hours (an hour not rolled up yet has none). A day file may hold hours outside
    `hours`: readers keep `stored_rows_sql(hours, …)`. An 8-week lookback reads about 60 files instead of 1,344: opening
    files, not reading rows, was most of an hourly refresh's feature query."""
    stored_days = set(storage.list_dir(*layout.rollup_days_root(kind)))
    day_files, open_hours = [], []
    for day, day_hours in hours_by_day(hours).items():
        day_parts = layout.rollup_day(kind, day)
        if day_parts[-1] in stored_days:
            day_files.append(storage.path(*day_parts, ROLLUP_FILE))
        else:
            open_hours += day_hours
    return day_files + existing_hour_paths(storage, layout.rollup_root(kind), open_hours, (ROLLUP_FILE,))


def stored_rows_sql(hours: list[datetime], unrolled: list[datetime]) -> str:
    """The condition on hour_idx that keeps the stored rollup rows of `hours` (which must be consecutive) except the
    `unrolled` ones, which the views compute from events: a build that lands between the two listings must not
    count an hour twice."""
    if not hours:
        return "FALSE"
    first, last = epoch_hour(hours[0]), epoch_hour(hours[-1])
    if len(set(hours)) != len(hours) or last - first + 1 != len(hours):
        raise ValueError(f"rollup views cover consecutive hours; got {len(hours)} hours from {hours[0]} to {hours[-1]}")
    computed = f" AND hour_idx NOT IN ({', '.join(str(epoch_hour(hour)) for hour in unrolled)})" if unrolled else ""
    return f"hour_idx >= {first} AND hour_idx <= {last}{computed}"


def read_rollup(spark: SparkSession, storage, kind: str, hours: list[datetime], unrolled: list[datetime]) -> DataFrame:
    paths = rollup_paths(storage, kind, hours)
    if not paths:
        return spark.createDataFrame([], ROLLUPS[kind])
    return spark.read.schema(ROLLUPS[kind]).parquet(*paths).where(stored_rows_sql(hours, unrolled))


def unrolled_hours(storage, hours: list[datetime]) -> list[datetime]:
    """The hours with events but no rollups yet. An hour counts as rolled up when its `counts` file exists, hourly or
    its day's: every hour with events has counts, while its property rollups may rightly be empty."""
    rolled_up = set(storage.list_dir(*layout.rollup_root("counts")))
    whole_days = set(storage.list_dir(*layout.rollup_days_root("counts")))
    with_events = set(storage.list_dir(*layout.events_root()))
    return [
        hour
        for hour in hours
        if (name := layout.hour_folder(hour)) in with_events
        and name not in rolled_up
        and layout.rollup_day("counts", hour)[-1] not in whole_days
    ]


# The view of events of hours not rolled up yet, read by the rollup views (a name no other query registers).
UNROLLED_EVENTS = "unrolled_ev"


def register_rollups(spark: SparkSession, storage, hours: list[datetime]) -> None:
    """Views `counts`, `props`, `users` over the given hours, the tables the feature SQL reads: the stored rollups,
    and for hours not rolled up yet the same rollup definitions computed from their events (a cold start needs no
    rollup backfill before its first features)."""
    unrolled = unrolled_hours(storage, hours)
    if unrolled:
        read_events(spark, storage, unrolled).selectExpr("*", f"{HOUR_IDX_SQL} AS hour_idx").createOrReplaceTempView(
            UNROLLED_EVENTS
        )
    for kind in ROLLUPS:
        frame = read_rollup(spark, storage, kind, hours, unrolled)
        if unrolled:
            frame = frame.unionByName(spark.sql(ROLLUP_SQL[kind].format(events=UNROLLED_EVENTS)))
        frame.createOrReplaceTempView(kind)


def parquet_rows(path) -> int:
    """Row count of a parquet file or folder from its footers, without reading data."""
    return ds.dataset(str(path), format="parquet").count_rows()


def write_frame(frame: DataFrame, storage, parts: tuple[str, ...]) -> int:
    """Write a Spark result as a parquet folder, swap it into place and return its row count."""
    with storage.temp_dir() as temp:
        frame.write.parquet(str(temp / "out"))
        rows = parquet_rows(temp / "out")
        storage.install(temp / "out", *parts)
    return rows
