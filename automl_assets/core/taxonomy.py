"""Choosing the signal: which events, event-property values and user-property values become features.

Statistics come from engine-neutral SQL over the rollups of the lookback before the training cutoff; the choice is a
pure function of them, so it is testable without an engine and identical for training and inference."""

import pandas as pd

from automl_assets.core.feature_sql import EventProperty, Taxonomy, UserProperty, usable_value

# A property becomes features through its most frequent values only if they describe most of its occurrences (of its
# users, for a user property); otherwise it is an identifier, an amount or free text, whose top values say little.
MIN_VALUE_COVERAGE = 0.5


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


def _top_values(group: pd.DataFrame, value: str, count: str, limit: int) -> tuple[tuple[str, ...], float]:
    """One property's `limit` most used values that can be features (ties by value), and the share of all its uses
    (`count`) they cover: values too long or odd to be features still count as uses, or a property of paths or
    free text with one short default value would look categorical."""
    # astype(bool): on an empty group the mask is an empty object Series, which pandas would take as columns.
    usable = group[group[value].map(lambda v: isinstance(v, str) and usable_value(v)).astype(bool)]
    top = usable.sort_values([count, value], ascending=[False, True]).head(limit)
    return tuple(top[value]), float(top[count].sum() / group[count].sum())


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

    props = property_stats[property_stats["event_type"].isin(events)]
    pairs = []
    for (event_type, key), group in props.groupby(["event_type", "prop_key"]):
        values, coverage = _top_values(group, "prop_value", "n", max_property_values)
        pairs.append((-group["n"].sum(), event_type, key, group["prop_value"].nunique(), values, coverage))
    event_properties, identifier_like_events, truncated = [], [], []
    for _, event_type, key, distinct, values, coverage in sorted(pairs, key=lambda pair: pair[:3]):  # most used first
        described = f"{event_type}.{key} ({distinct} values, the top {len(values)} cover {coverage:.1%} of uses)"
        if not usable_value(key) or coverage < MIN_VALUE_COVERAGE:
            identifier_like_events.append(described)
        elif len(event_properties) < top_properties:
            event_properties.append(EventProperty(event_type, key, values))
            if len(values) < distinct:
                truncated.append(described)

    user_properties, identifier_like = [], []
    for key, group in sorted(user_property_stats.groupby("prop_key"), key=lambda item: item[0]):
        values, coverage = _top_values(group, "value", "users", user_property_values)
        if not usable_value(key) or coverage < MIN_VALUE_COVERAGE:
            identifier_like.append(key)
            continue
        user_properties.append(UserProperty(key, values))

    taxonomy = Taxonomy(events, revenue_events, tuple(event_properties), tuple(user_properties), weeks)
    report = {
        "identifier_like_event_properties": identifier_like_events,
        "event_properties_on_their_top_values": truncated,
        "identifier_like_user_properties": identifier_like,
        "events_available": int(len(ranked)),
    }
    return taxonomy, report
