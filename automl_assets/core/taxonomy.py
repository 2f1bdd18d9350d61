"""Choosing the signal: which events, event-property values and user-property values become features.

Statistics come from engine-neutral SQL over the rollups of the lookback before the training cutoff; the choice is a
pure function of them, so it is testable without an engine and identical for training and inference."""

import pandas as pd

from automl_assets.core.feature_sql import EventProperty, Taxonomy, UserProperty, usable_value

# A user property is one-hot encoded only if its top values describe most users; otherwise it is an identifier.
MIN_USER_PROPERTY_COVERAGE = 0.5


def event_stats_sql(start_hour: int, end_hour: int) -> str:
    return (
        "SELECT event_type, SUM(n) AS n, SUM(COALESCE(revenue, 0)) AS revenue FROM counts "
        f"WHERE hour_idx >= {start_hour} AND hour_idx < {end_hour} GROUP BY event_type"
    )


def property_stats_sql(start_hour: int, end_hour: int) -> str:
    return (
        "SELECT event_type, prop_key, prop_value, SUM(n) AS n FROM props "
        f"WHERE hour_idx >= {start_hour} AND hour_idx < {end_hour} GROUP BY event_type, prop_key, prop_value"
    )


def user_property_stats_sql(start_hour: int, end_hour: int) -> str:
    return (
        "SELECT prop_key, last_value AS value, COUNT(DISTINCT user_id) AS users FROM users "
        f"WHERE hour_idx >= {start_hour} AND hour_idx < {end_hour} GROUP BY prop_key, last_value"
    )


def select_taxonomy(
    event_stats: pd.DataFrame,
    property_stats: pd.DataFrame,
    user_property_stats: pd.DataFrame,
    *,
    top_events: int,
    top_properties: int,
    max_property_values: int,
    user_property_values: int,
    weeks: int,
) -> tuple[Taxonomy, dict]:
    """Returns the taxonomy and a report of what was left out and why."""
    ranked = event_stats[event_stats["event_type"].map(usable_value)].sort_values(
        ["n", "event_type"], ascending=[False, True]
    )
    events = tuple(ranked["event_type"].head(top_events))
    revenue_events = tuple(sorted(ranked[(ranked["revenue"] > 0) & ranked["event_type"].isin(events)]["event_type"]))

    props = property_stats[property_stats["event_type"].isin(events) & property_stats["prop_value"].map(usable_value)]
    pairs = props.groupby(["event_type", "prop_key"]).agg(n=("n", "sum"), distinct=("prop_value", "nunique")).reset_index()
    too_many = pairs[pairs["distinct"] > max_property_values]
    pairs = pairs[pairs["distinct"] <= max_property_values].sort_values(
        ["n", "event_type", "prop_key"], ascending=[False, True, True]
    ).head(top_properties)
    event_properties = []
    for row in pairs.itertuples():
        values = props[(props["event_type"] == row.event_type) & (props["prop_key"] == row.prop_key)]
        values = values.sort_values(["n", "prop_value"], ascending=[False, True])["prop_value"]
        event_properties.append(EventProperty(row.event_type, row.prop_key, tuple(values)))

    user_properties, identifier_like = [], []
    usable = user_property_stats[user_property_stats["value"].map(lambda v: isinstance(v, str) and usable_value(v))]
    for key, group in sorted(usable.groupby("prop_key"), key=lambda item: item[0]):
        group = group.sort_values(["users", "value"], ascending=[False, True])
        top = group.head(user_property_values)
        if not usable_value(key) or top["users"].sum() < MIN_USER_PROPERTY_COVERAGE * group["users"].sum():
            identifier_like.append(key)
            continue
        user_properties.append(UserProperty(key, tuple(top["value"])))

    taxonomy = Taxonomy(events, revenue_events, tuple(event_properties), tuple(user_properties), weeks)
    report = {
        "high_cardinality_event_properties": [f"{r.event_type}.{r.prop_key} ({r.distinct} values)" for r in too_many.itertuples()],
        "identifier_like_user_properties": identifier_like,
        "events_available": int(len(ranked)),
    }
    return taxonomy, report
