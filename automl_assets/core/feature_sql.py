"""The feature definitions, written once as engine-neutral SQL over the hourly rollups.

The same text runs on Spark SQL and DuckDB, so training and inference (and any engine) share one definition.
Rules that keep it portable: column names are sanitised to [a-z0-9_] so they need no quoting; string literals are
single-quoted with quotes doubled and never hold a backslash; the time axis is the integer `hour_idx` (hours since
the epoch), so every window is an integer comparison with no time-zone or timestamp-literal dialects.

Tables the SQL reads (each a view over the rollup parquet of the hours it needs):
  counts(user_id, event_type, hour_idx, n, revenue)
  props(user_id, event_type, prop_key, prop_value, hour_idx, n)
  users(user_id, prop_key, hour_idx, first_value, first_time, last_value, last_time)
"""

import re
from dataclasses import dataclass, field
from datetime import timedelta

HOURS_PER_WEEK = 168
PROPERTY_WEEKS = 4  # event-property counts look at the most recent 4 weeks: enough signal, a quarter of the width


def sql_literal(value: str) -> str:
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{value!r} cannot be used in a feature: backslashes and control characters are not portable")
    return "'" + value.replace("'", "''") + "'"


MAX_PROPERTY_VALUE_LENGTH = 100  # longer values are free text or ids: no use as categorical signal
# The props rollup stores every longer value as this one, which no taxonomy picks: they still count as the property's
# uses when the taxonomy asks how much of them its top values cover.
LONG_VALUE = "~" * (MAX_PROPERTY_VALUE_LENGTH + 1)


def bounded_value_sql(column: str) -> str:
    """`column`, or LONG_VALUE for a value too long to be a feature (the same SQL on both engines)."""
    return f"CASE WHEN length({column}) <= {MAX_PROPERTY_VALUE_LENGTH} THEN {column} ELSE '{LONG_VALUE}' END"


def usable_value(value: str) -> bool:
    """Values a taxonomy may pick: anything sql_literal accepts, no longer than MAX_PROPERTY_VALUE_LENGTH."""
    return "\\" not in value and all(ord(ch) >= 32 for ch in value) and len(value) <= MAX_PROPERTY_VALUE_LENGTH


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "x"


@dataclass(frozen=True)
class EventProperty:
    event_type: str
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class UserProperty:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    """The signal a prediction uses: selected events, event-property values and user-property values."""

    events: tuple[str, ...]
    revenue_events: tuple[str, ...] = ()
    event_properties: tuple[EventProperty, ...] = ()
    user_properties: tuple[UserProperty, ...] = ()
    weeks: int = 8

    @property
    def lookback(self) -> timedelta:
        """How far back its features read: a scoring run reads the weeks of the model's taxonomy, whatever the spec
        says now."""
        return timedelta(weeks=self.weeks)

    def to_dict(self) -> dict:
        return {
            "events": list(self.events),
            "revenue_events": list(self.revenue_events),
            "event_properties": [
                {"event_type": p.event_type, "key": p.key, "values": list(p.values)} for p in self.event_properties
            ],
            "user_properties": [{"key": p.key, "values": list(p.values)} for p in self.user_properties],
            "weeks": self.weeks,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Taxonomy":
        return cls(
            events=tuple(data["events"]),
            revenue_events=tuple(data.get("revenue_events", ())),
            event_properties=tuple(
                EventProperty(p["event_type"], p["key"], tuple(p["values"])) for p in data.get("event_properties", ())
            ),
            user_properties=tuple(UserProperty(p["key"], tuple(p["values"])) for p in data.get("user_properties", ())),
            weeks=int(data.get("weeks", 8)),
        )


@dataclass
class _Names:
    """Hands out unique sanitised column names."""

    taken: set[str] = field(default_factory=set)

    def __call__(self, *parts: str) -> str:
        base = "f__" + "__".join(_slug(part) for part in parts)
        name, suffix = base, 2
        while name in self.taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.taken.add(name)
        return name


@dataclass(frozen=True)
class FeatureQuery:
    sql: str
    columns: tuple[str, ...]  # feature columns in matrix order (user_id comes first in the result)
    # The value of a column for a cohort user with no row (no event in the lookback) where it is not 0: "hours
    # since" is the lookback + 1h, as for a user whose rows lack that event.
    absent: dict[str, float] = field(default_factory=dict)


def feature_query(taxonomy: Taxonomy, as_of_hour: int, users: str | None = None) -> FeatureQuery:
    """SQL for one row per user with any event in the lookback before `as_of_hour` (an epoch hour, exclusive):
    weekly counts per selected event, hours since its last occurrence, weekly revenue, event-property value counts
    over the most recent weeks, and first/last user-property values one-hot. Nothing at or after the cutoff is read.
    `users` names a view with a user_id column (the cohort) that restricts the rows before aggregating, so a run
    aggregates only the histories it needs (an hourly run's cohort is the users active in the hour)."""
    names = _Names()
    only = f" AND user_id IN (SELECT user_id FROM {users})" if users else ""
    weeks = taxonomy.weeks
    start = as_of_hour - weeks * HOURS_PER_WEEK
    never = weeks * HOURS_PER_WEEK + 1  # "hours since" for a user who never did it in the window

    # Weekly counts per event come from a PIVOT: each (user, event, week) lands in its one column, where a wide
    # SUM(CASE ...) evaluates every column's condition on every row (P1's cold build: 12% faster on DuckDB). The
    # other count features are aggregated beside it from the same rows.
    count_cols, count_exprs, pivot_keys, absent = [], [], [], {}
    for week in range(weeks):
        name = names("all", f"w{week + 1}")
        count_cols.append(name)
        count_exprs.append(f"SUM(CASE WHEN wk = {week} THEN n ELSE 0 END) AS {name}")
    for label, expr in (("active_hours", "COUNT(DISTINCT hour_idx)"), ("hours_since", f"{as_of_hour} - MAX(hour_idx)")):
        name = names("all", label)
        count_cols.append(name)
        count_exprs.append(f"{expr} AS {name}")
        if label == "hours_since":
            absent[name] = float(never)
    pivoted = set()
    for event in taxonomy.events:
        literal = sql_literal(event)
        for week in range(weeks):
            name = names(event, f"w{week + 1}")
            count_cols.append(name)
            pivoted.add(name)
            pivot_keys.append(f"{sql_literal(f'{event}__w{week + 1}')} AS {name}")  # the week suffix is digits
        name = names(event, "hours_since")
        count_cols.append(name)
        absent[name] = float(never)
        count_exprs.append(
            f"COALESCE({as_of_hour} - MAX(CASE WHEN event_type = {literal} THEN hour_idx END), {never}) AS {name}"
        )
    for event in taxonomy.revenue_events:
        literal = sql_literal(event)
        for week in range(weeks):
            name = names(event, "revenue", f"w{week + 1}")
            count_cols.append(name)
            count_exprs.append(
                f"SUM(CASE WHEN event_type = {literal} AND wk = {week} THEN COALESCE(revenue, 0) ELSE 0 END) AS {name}"
            )
    # Counts are summed as DOUBLE (exact below 2^53): DuckDB sums BIGINT into 128-bit states, which made the wide
    # aggregate about 30% slower (benchmarks/README.md, P1).
    ctes = [
        (
            "window_counts",
            f"SELECT user_id, event_type, hour_idx, CAST(n AS DOUBLE) AS n, revenue, "
            f"CAST(FLOOR(({as_of_hour} - 1 - hour_idx) / {HOURS_PER_WEEK}) AS INT) AS wk FROM counts "
            f"WHERE hour_idx >= {start} AND hour_idx < {as_of_hour}{only}",
        ),
        ("count_aggregates", f"SELECT user_id, {', '.join(count_exprs)} FROM window_counts GROUP BY user_id"),
    ]
    if pivot_keys:
        ctes.append(
            (
                "weekly_event_counts",
                "SELECT * FROM (SELECT user_id, event_type || '__w' || CAST(wk + 1 AS STRING) AS event_week, n "
                f"FROM window_counts) PIVOT (SUM(n) FOR event_week IN ({', '.join(pivot_keys)}))",
            )
        )
    counts_sql = (
        "SELECT a.user_id AS user_id, "
        + ", ".join(f"COALESCE(w.{col}, 0) AS {col}" if col in pivoted else f"a.{col} AS {col}" for col in count_cols)
        + " FROM count_aggregates a"
        + (" LEFT JOIN weekly_event_counts w ON w.user_id = a.user_id" if pivot_keys else "")
    )
    parts = [("cnt", counts_sql, count_cols)]

    if taxonomy.event_properties:
        prop_start = as_of_hour - min(PROPERTY_WEEKS, weeks) * HOURS_PER_WEEK
        cols, exprs = [], []
        for prop in taxonomy.event_properties:
            for value in prop.values:
                name = names(prop.event_type, prop.key, value)
                cols.append(name)
                exprs.append(
                    f"SUM(CASE WHEN event_type = {sql_literal(prop.event_type)} AND prop_key = {sql_literal(prop.key)} "
                    f"AND prop_value = {sql_literal(value)} THEN n ELSE 0 END) AS {name}"
                )
        parts.append(
            (
                "prp",
                f"SELECT user_id, {', '.join(exprs)} FROM (SELECT user_id, event_type, prop_key, prop_value, hour_idx, "
                "CAST(n AS DOUBLE) AS n FROM props) p "
                f"WHERE hour_idx >= {prop_start} AND hour_idx < {as_of_hour}{only} GROUP BY user_id",
                cols,
            )
        )

    if taxonomy.user_properties:
        cols, exprs = [], []
        for prop in taxonomy.user_properties:
            for which in ("first", "last"):
                for value in prop.values:
                    name = names("user", prop.key, value, which)
                    cols.append(name)
                    exprs.append(
                        f"MAX(CASE WHEN prop_key = {sql_literal(prop.key)} AND {which}_value = {sql_literal(value)} "
                        f"THEN 1 ELSE 0 END) AS {name}"
                    )
        keys = ", ".join(sql_literal(p.key) for p in taxonomy.user_properties)
        parts.append(
            (
                "usr",
                f"SELECT user_id, {', '.join(exprs)} FROM ({user_property_values_sql(as_of_hour, weeks, keys, only)}) u "
                "GROUP BY user_id",
                cols,
            )
        )

    first_alias = parts[0][0]
    select = [f"{first_alias}.user_id AS user_id"]
    joins = [f"({parts[0][1]}) {first_alias}"]
    for alias, sql, cols in parts:
        fill = "COALESCE({a}.{c}, 0)" if alias != first_alias else "{a}.{c}"
        select += [f"CAST({fill.format(a=alias, c=col)} AS DOUBLE) AS {col}" for col in cols]
        if alias != first_alias:
            joins.append(f"LEFT JOIN ({sql}) {alias} ON {alias}.user_id = {first_alias}.user_id")
    columns = tuple(col for _, _, cols in parts for col in cols)
    with_clause = "WITH " + ", ".join(f"{name} AS ({sql})" for name, sql in ctes)
    return FeatureQuery(sql=f"{with_clause} SELECT {', '.join(select)} FROM {' '.join(joins)}", columns=columns, absent=absent)


def user_property_values_sql(as_of_hour: int, weeks: int, keys_sql: str | None = None, extra_filter: str = "") -> str:
    """Each user's first and last value of each user property seen in the lookback before the cutoff."""
    start = as_of_hour - weeks * HOURS_PER_WEEK
    key_filter = (f" AND prop_key IN ({keys_sql})" if keys_sql else "") + extra_filter
    return (
        "SELECT user_id, prop_key, MIN_BY(first_value, first_time) AS first_value, "
        "MAX_BY(last_value, last_time) AS last_value FROM users "
        f"WHERE hour_idx >= {start} AND hour_idx < {as_of_hour}{key_filter} GROUP BY user_id, prop_key"
    )


def cohort_query(
    as_of_hour: int, active_hours: int, lookback_weeks: int, where: dict[str, str], only_active_last_hour: bool = False
) -> str:
    """Users with an event in [cutoff - active_within, cutoff) whose last user-property values match `where`;
    `active_last_hour` marks those seen in the hour just before the cutoff (the hourly scoring set). With
    `only_active_last_hour`, that set alone: a user seen in the last hour is active within any window of an hour or
    more, so only that hour is read."""
    first_hour = as_of_hour - (1 if only_active_last_hour else active_hours)
    active = (
        f"SELECT user_id, MAX(CASE WHEN hour_idx = {as_of_hour - 1} THEN 1 ELSE 0 END) AS active_last_hour "
        f"FROM counts WHERE hour_idx >= {first_hour} AND hour_idx < {as_of_hour} GROUP BY user_id"
    )
    if not where:
        return active
    conditions = " OR ".join(
        f"(prop_key = {sql_literal(key)} AND last_value = {sql_literal(value)})" for key, value in sorted(where.items())
    )
    matching = (
        f"SELECT user_id FROM ({user_property_values_sql(as_of_hour, lookback_weeks)}) v WHERE {conditions} "
        f"GROUP BY user_id HAVING COUNT(*) = {len(where)}"
    )
    return f"SELECT a.user_id, a.active_last_hour FROM ({active}) a JOIN ({matching}) m ON a.user_id = m.user_id"


def label_query(event: str | None, where: dict[str, str], sum_revenue: bool) -> str:
    """Per user, the outcome over a view `ev` of the events in the label window: how many qualifying events (a
    classification target), or the revenue summed (a regression target). The window is the set of hour files read."""
    if sum_revenue:
        return "SELECT user_id, SUM(COALESCE(revenue, 0)) AS outcome FROM ev GROUP BY user_id"
    conditions = [f"event_type = {sql_literal(event)}"] + [
        f"event_properties[{sql_literal(key)}] = {sql_literal(value)}" for key, value in sorted(where.items())
    ]
    return f"SELECT user_id, COUNT(*) AS outcome FROM ev WHERE {' AND '.join(conditions)} GROUP BY user_id"


def _feature_columns(columns: tuple[str, ...], absent: dict[str, float]) -> str:
    return ", ".join(f"CAST(COALESCE(f.{c}, {absent.get(c, 0)}) AS DOUBLE) AS {c}" for c in columns)


def matrix_query(columns: tuple[str, ...], absent: dict[str, float]) -> str:
    """Cohort users left-joined to their features (a user without a row gets FeatureQuery.absent, else 0). Views:
    `cohort`, `features`."""
    return (
        f"SELECT c.user_id, c.active_last_hour, {_feature_columns(columns, absent)} FROM cohort c "
        "LEFT JOIN features f ON f.user_id = c.user_id ORDER BY c.user_id"
    )


def training_matrix_query(columns: tuple[str, ...], absent: dict[str, float], snapshots: int) -> str:
    """Per training snapshot k (weeks back from the newest), its cohort left-joined to its features (as
    matrix_query) and its label (absent -> 0), stacked with `snapshot` = k. Views: `cohort_k`, `features_k`,
    `labels_k`."""
    stacked = " UNION ALL ".join(
        f"SELECT c.user_id, CAST({k} AS INT) AS snapshot, CAST(CASE WHEN l.outcome > 0 THEN 1 ELSE 0 END AS INT) "
        f"AS label, {_feature_columns(columns, absent)} FROM cohort_{k} c LEFT JOIN features_{k} f ON f.user_id = c.user_id "
        f"LEFT JOIN labels_{k} l ON l.user_id = c.user_id"
        for k in range(snapshots)
    )
    return f"SELECT * FROM ({stacked}) m ORDER BY snapshot, user_id"
