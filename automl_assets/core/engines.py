"""Two engines for one set of SQL definitions: DuckDB embedded (the single-machine default) and Spark (local or a
cluster). The feature, label, cohort, taxonomy and matrix SQL in feature_sql.py / taxonomy.py runs unchanged on
both; only reading files into views, the hourly rollups' map explode, and writing results differ, and they live here.

Every engine offers the same verbs to the assets: register views over the store, run a query into pandas, write a
query's result into the store, build rollups."""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from automl_assets.core import event_store, layout, spark_jobs
from automl_assets.core.feature_sql import bounded_value_sql
from automl_assets.core.timewin import (
    DAY,
    HOUR,
    HOURS_PER_DAY,
    epoch_hour,
    from_epoch_hour,
    hours_between,
    hours_by_day,
)

_DUCKDB_TYPES = {"string": "VARCHAR", "long": "BIGINT", "double": "DOUBLE", "timestamp": "TIMESTAMPTZ", "map": "MAP(VARCHAR, VARCHAR)"}

_DUCKDB_ROLLUP_SQL = {
    "counts": spark_jobs.ROLLUP_SQL["counts"],
    "props": f"SELECT user_id, event_type, e.key AS prop_key, {bounded_value_sql('e.value')} AS prop_value, hour_idx, "
    "COUNT(*) AS n FROM (SELECT user_id, event_type, hour_idx, unnest(map_entries(event_properties)) AS e FROM {events}) p "
    "GROUP BY ALL",
    # Same tie-break as Spark: (event_time, insert_id).
    "users": "SELECT user_id, u.key AS prop_key, hour_idx, "
    "arg_min(u.value, (event_time, insert_id)) AS first_value, min(event_time) AS first_time, "
    "arg_max(u.value, (event_time, insert_id)) AS last_value, max(event_time) AS last_time "
    "FROM (SELECT user_id, hour_idx, event_time, insert_id, unnest(map_entries(user_properties)) AS u FROM {events}) p "
    "GROUP BY user_id, u.key, hour_idx",
}


# Rows sorted by the group keys: engines return groups in no fixed order, and a re-run must write identical files.
_ROLLUP_ORDER = {
    "counts": ("user_id", "event_type"),
    "props": ("user_id", "event_type", "prop_key", "prop_value"),
    "users": ("user_id", "prop_key"),
}
# A range of hours is rolled up a week of UTC days at a time: one query per kind and week, so what comes back to
# Python (and, on Spark, to the driver) stays the size of a week whatever the backfill.
ROLLUP_CHUNK_DAYS = 7


def _path_literal(path) -> str:
    """A file path as a DuckDB string literal (a store under a folder named with a quote works too)."""
    return "'" + str(path).replace("'", "''") + "'"


def _ordered(kind: str, sql: str) -> str:
    """The rollup query with its rows sorted by hour, then by the group keys."""
    return f"SELECT * FROM ({sql}) r ORDER BY {', '.join(('hour_idx', *_ROLLUP_ORDER[kind]))}"


def _sorted(kind: str, table: pa.Table) -> pa.Table:
    """The same order, by Arrow (for Spark, whose global ORDER BY costs a sampling job and a shuffle per query)."""
    return table.sort_by([(column, "ascending") for column in ("hour_idx", *_ROLLUP_ORDER[kind])])


def _runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of equal values in sorted `keys`."""
    if not len(keys):
        return []
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1, [len(keys)]])
    return [(int(start), int(stop - start)) for start, stop in zip(cuts[:-1], cuts[1:])]


def _write_hours(storage, kind: str, table: pa.Table) -> None:
    """One hourly file per hour of `table` (rows sorted by hour_idx)."""
    hour_idx = table["hour_idx"].to_numpy()
    for offset, rows in _runs(hour_idx):
        storage.write_table(
            table.slice(offset, rows), *layout.rollup_hour(kind, from_epoch_hour(int(hour_idx[offset]))), spark_jobs.ROLLUP_FILE
        )


def _day_without(storage, kind: str, day: datetime, hours: list[datetime]) -> pa.Table:
    """The rows of a day's file outside `hours`."""
    stored = storage.read_table(*layout.rollup_day(kind, day), spark_jobs.ROLLUP_FILE)
    dropped = pa.array([epoch_hour(hour) for hour in hours], pa.int64())
    return stored.filter(pc.invert(pc.is_in(stored["hour_idx"], value_set=dropped)))


def write_rollups(storage, kind: str, table: pa.Table, hours: list[datetime], whole_days: set[datetime]) -> int:
    """Store the rollups of `hours` (rows sorted by hour_idx, then the group keys, whatever engine made them), a UTC
    day at a time under the day's lock: a day the build covered whole as one day file; the hours of a day that has
    a day file rewritten inside it; the other hours as hourly files."""
    table = table.cast(spark_jobs.ROLLUP_ARROW[kind])
    day_of_row = table["hour_idx"].to_numpy() // HOURS_PER_DAY
    for day, day_hours in hours_by_day(hours).items():
        day_index = epoch_hour(day) // HOURS_PER_DAY
        first, stop = np.searchsorted(day_of_row, [day_index, day_index + 1])
        rows = table.slice(first, stop - first)
        day_parts = layout.rollup_day(kind, day)
        with storage.exclusive(*day_parts):
            if day in whole_days:
                storage.write_table(rows, *day_parts, spark_jobs.ROLLUP_FILE)
            elif storage.exists(*day_parts):
                merged = pa.concat_tables([_day_without(storage, kind, day, day_hours), rows])
                storage.write_table(_sorted(kind, merged), *day_parts, spark_jobs.ROLLUP_FILE)
            else:
                _write_hours(storage, kind, rows)
    return table.num_rows


def compact_day(storage, day: datetime) -> None:
    """Each kind's day file from the day's hourly files, for a day that is over and was rolled up over several builds
    (in the hourly runs, the run of its last hour). Not while an hour of the day has events but no rollups: a day
    file stands for every hour of its day."""
    hours = hours_between(day, day + DAY)
    if spark_jobs.unrolled_hours(storage, hours):
        return
    for kind in layout.ROLLUP_KINDS:
        day_parts = layout.rollup_day(kind, day)
        with storage.exclusive(*day_parts):
            paths = spark_jobs.existing_hour_paths(storage, layout.rollup_root(kind), hours, (spark_jobs.ROLLUP_FILE,))
            if paths and not storage.exists(*day_parts):
                storage.write_table(pa.concat_tables([pq.read_table(path) for path in paths]), *day_parts, spark_jobs.ROLLUP_FILE)


# Hourly files of a day stored whole stay this long after its day file is written: a run that listed them before
# may still be reading them.
REPLACED_HOURS_KEPT = DAY


def remove_replaced_hours(storage, now: datetime) -> None:
    """Remove the hourly files of days whose day file (which readers use instead) is REPLACED_HOURS_KEPT old."""
    for kind in layout.ROLLUP_KINDS:
        stored_days = set(storage.list_dir(*layout.rollup_days_root(kind)))
        hourly = [layout.folder_hour(name) for name in storage.list_dir(*layout.rollup_root(kind))]
        for day, day_hours in hours_by_day(hourly).items():
            day_parts = layout.rollup_day(kind, day)
            if day_parts[-1] not in stored_days:
                continue
            with storage.exclusive(*day_parts):
                day_file = (*day_parts, spark_jobs.ROLLUP_FILE)
                if storage.exists(*day_file) and now - storage.modified_at(*day_file) >= REPLACED_HOURS_KEPT:
                    for hour in day_hours:
                        storage.remove(*layout.rollup_hour(kind, hour))


def remove_rollups(storage, hours: list[datetime]) -> None:
    """Forget the rollups of `hours`, so the rollup views compute them from the events again (for tests and
    benchmarks: a run reading those files at the time fails). A day with a day file goes back to hourly files for
    its other hours."""
    for kind in layout.ROLLUP_KINDS:
        for day, day_hours in hours_by_day(hours).items():
            day_parts = layout.rollup_day(kind, day)
            with storage.exclusive(*day_parts):
                if storage.exists(*day_parts):
                    _write_hours(storage, kind, _day_without(storage, kind, day, day_hours))
                    storage.remove(*day_parts)
                for hour in day_hours:
                    storage.remove(*layout.rollup_hour(kind, hour))


def build_rollups_by_week(
    storage, hours: list[datetime], register: Callable[[list[datetime]], None], query: Callable[[str], pa.Table]
) -> dict[str, int]:
    """For each 7 UTC days of `hours`: `register` the view `ev` (events with hour_idx) over those hours, then write
    each kind's rows, `query(kind)` returning them as Arrow sorted by hour_idx and the group keys. One kind's files
    are written on a thread while the engine runs the next query (both release the GIL); one write at a time keeps at
    most two results in memory. A day the build covers whole is stored as one day file; a day it covers in part that
    is over gets its day file from the hourly files once the build is written (compact_day)."""
    rows = dict.fromkeys(_ROLLUP_ORDER, 0)
    if not hours:
        return rows
    by_day = hours_by_day(hours)
    whole_days = {day for day, day_hours in by_day.items() if len(day_hours) == HOURS_PER_DAY}
    # A day is over once the build reaches its end or events after it are stored.
    newest = max(hours[-1], event_store.newest_stored_hour(storage) or hours[-1])
    ended_in_part = [day for day in by_day if day not in whole_days and day + DAY <= newest + HOUR]
    days = list(by_day.values())
    written: list[tuple[str, Future]] = []
    with ThreadPoolExecutor(1) as writer:
        for start in range(0, len(days), ROLLUP_CHUNK_DAYS):
            chunk = [hour for day_hours in days[start : start + ROLLUP_CHUNK_DAYS] for hour in day_hours]
            register(chunk)
            for kind in rows:
                table = query(kind)
                if written:
                    written[-1][1].result()
                written.append((kind, writer.submit(write_rollups, storage, kind, table, chunk, whole_days)))
    for kind, future in written:
        rows[kind] += future.result()
    for day in ended_in_part:
        compact_day(storage, day)
    remove_replaced_hours(storage, datetime.now(timezone.utc))
    return rows


class SparkEngine:
    name = "spark"

    def __init__(self, session):
        self.session = spark_jobs.prepare(session)

    def register_events(self, storage, hours: list[datetime], view: str = "ev") -> None:
        spark_jobs.read_events(self.session, storage, hours).createOrReplaceTempView(view)

    def register_rollups(self, storage, hours: list[datetime]) -> None:
        spark_jobs.register_rollups(self.session, storage, hours)

    def register_parquet(self, view: str, path: str) -> None:
        self.session.read.parquet(path).createOrReplaceTempView(view)

    def register_query(self, view: str, sql: str) -> None:
        self.session.sql(sql).createOrReplaceTempView(view)

    def to_pandas(self, sql: str):
        return self.session.sql(sql).toPandas()

    def write(self, sql: str, storage, parts: tuple[str, ...]) -> int:
        return spark_jobs.write_frame(self.session.sql(sql), storage, parts)

    def build_rollups(self, storage, hours: list[datetime]) -> dict[str, int]:
        """A week of hours per Spark job and rollup kind; results come back as Arrow (a week's rollups are small) and
        are written as day and hour files like DuckDB's: thousands of tiny Spark output folders cost more than the work."""

        def register(week: list[datetime]) -> None:
            events = spark_jobs.read_events(self.session, storage, week)
            events.selectExpr("*", f"{spark_jobs.HOUR_IDX_SQL} AS hour_idx").createOrReplaceTempView("ev")

        def query(kind: str) -> pa.Table:
            return _sorted(kind, self.session.sql(spark_jobs.ROLLUP_SQL[kind].format(events="ev")).toArrow())

        return build_rollups_by_week(storage, hours, register, query)


class DuckDBEngine:
    name = "duckdb"

    def __init__(self, connection):
        self.con = connection
        self.con.execute("SET TimeZone = 'UTC'")

    def _view(self, view: str, paths: list[str], schema, where: str = "") -> None:
        if paths:
            files = ", ".join(map(_path_literal, paths))
            source = f"SELECT * FROM read_parquet([{files}])" + (f" WHERE {where}" if where else "")
        else:
            columns = ", ".join(f"CAST(NULL AS {_DUCKDB_TYPES[f.dataType.typeName()]}) AS {f.name}" for f in schema)
            source = f"SELECT {columns} WHERE false"
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS {source}")

    def register_events(self, storage, hours: list[datetime], view: str = "ev") -> None:
        paths = spark_jobs.existing_hour_paths(storage, layout.events_root(), hours, ("events.parquet",))
        self._view(view, paths, spark_jobs.EVENTS)

    def _register_events_with_hours(self, storage, hours: list[datetime], view: str) -> None:
        self.register_events(storage, hours, f"{view}_raw")
        self.con.execute(
            f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT *, "
            f"CAST(floor(epoch_us(event_time) / 3600000000) AS BIGINT) AS hour_idx FROM {view}_raw"
        )

    def register_rollups(self, storage, hours: list[datetime]) -> None:
        """The stored rollups, and for hours not rolled up yet the same definitions over their events (see
        spark_jobs.register_rollups)."""
        unrolled = spark_jobs.unrolled_hours(storage, hours)
        if unrolled:
            self._register_events_with_hours(storage, unrolled, spark_jobs.UNROLLED_EVENTS)
        for kind, schema in spark_jobs.ROLLUPS.items():
            paths = spark_jobs.rollup_paths(storage, kind, hours)
            stored = f"{kind}_stored" if unrolled else kind
            self._view(stored, paths, schema, spark_jobs.stored_rows_sql(hours, unrolled))
            if unrolled:
                computed = _DUCKDB_ROLLUP_SQL[kind].format(events=spark_jobs.UNROLLED_EVENTS)
                self.con.execute(f"CREATE OR REPLACE TEMP VIEW {kind} AS SELECT * FROM {stored} UNION ALL BY NAME {computed}")

    def register_parquet(self, view: str, path: str) -> None:
        # A folder written by either engine: its part files.
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM read_parquet({_path_literal(f'{path}/*.parquet')})")

    def register_query(self, view: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS {sql}")

    def to_pandas(self, sql: str):
        return self.con.sql(sql).df()

    def write(self, sql: str, storage, parts: tuple[str, ...]) -> int:
        with storage.temp_dir() as temp:
            (temp / "out").mkdir()
            self.con.execute(f"COPY ({sql}) TO {_path_literal(temp / 'out' / 'part-0.parquet')} (FORMAT parquet, COMPRESSION zstd)")
            rows = spark_jobs.parquet_rows(temp / "out")
            storage.install(temp / "out", *parts)
        return rows

    def build_rollups(self, storage, hours: list[datetime]) -> dict[str, int]:
        def register(week: list[datetime]) -> None:
            self._register_events_with_hours(storage, week, "ev")

        def query(kind: str) -> pa.Table:
            return self.con.sql(_ordered(kind, _DUCKDB_ROLLUP_SQL[kind].format(events="ev"))).to_arrow_table()

        return build_rollups_by_week(storage, hours, register, query)
