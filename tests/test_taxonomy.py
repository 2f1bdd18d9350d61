"""Choosing the signal (core/taxonomy.select_taxonomy): which events, property values and user-property values become
features, and what the report says about the rest."""

import pandas as pd

from automl_assets.core.feature_sql import LONG_VALUE, EventProperty, UserProperty, feature_query
from automl_assets.core.taxonomy import select_taxonomy

EVENTS = pd.DataFrame({"event_type": ["purchase", "view"], "n": [500, 900], "revenue": [1200.0, 0.0]})


def property_stats(key: str, counts: list[int], event_type: str = "purchase") -> pd.DataFrame:
    return pd.DataFrame(
        {"event_type": event_type, "prop_key": key, "prop_value": [f"{key}_{i:03d}" for i in range(len(counts))], "n": counts}
    )


def select(props: pd.DataFrame, users: pd.DataFrame | None = None, **options):
    if users is None:  # no user properties at all, as the engine returns it
        users = pd.DataFrame({"prop_key": pd.Series(dtype=object), "value": pd.Series(dtype=object), "users": pd.Series(dtype="int64")})
    settings = {"top_events": 50, "top_properties": 10, "max_property_values": 20, "user_property_values": 10, "weeks": 8}
    return select_taxonomy(EVENTS, props, users, **(settings | options))


def test_a_property_with_more_values_than_the_cap_keeps_its_most_frequent_ones():
    # 30 departments, the 20 most used covering most purchases: they become features, the rest are dropped.
    departments = property_stats("department", [100 - 3 * i for i in range(30)])
    taxonomy, report = select(departments)
    kept = departments.sort_values("n", ascending=False)["prop_value"].head(20)
    assert taxonomy.event_properties == (EventProperty("purchase", "department", tuple(kept)),)
    assert report["event_properties_on_their_top_values"] == ["purchase.department (30 values, the top 20 cover 84.4% of uses)"]
    assert report["identifier_like_event_properties"] == []


def test_identifiers_and_amounts_are_left_out_and_small_properties_keep_every_value():
    item_ids = property_stats("item_id", [1] * 400)  # the top 20 describe 5% of uses
    pages = property_stats("page", [40, 30, 5], event_type="view")
    taxonomy, report = select(pd.concat([item_ids, pages]))
    assert taxonomy.event_properties == (EventProperty("view", "page", ("page_000", "page_001", "page_002")),)
    assert report["identifier_like_event_properties"] == ["purchase.item_id (400 values, the top 20 cover 5.0% of uses)"]
    assert report["event_properties_on_their_top_values"] == []


def test_properties_are_ranked_by_use_up_to_top_properties():
    props = pd.concat([property_stats("a", [5, 5]), property_stats("b", [50, 50]), property_stats("c", [20])])
    taxonomy, _ = select(props, top_properties=2)
    assert [p.key for p in taxonomy.event_properties] == ["b", "c"]  # by uses: 100, 20, then a 10


def test_user_properties_follow_the_same_coverage_rule():
    users = pd.DataFrame(
        {
            "prop_key": ["plan"] * 3 + ["email"] * 50,
            "value": ["free", "pro", "team"] + [f"user{i}@example.com" for i in range(50)],
            "users": [60, 30, 10] + [1] * 50,
        }
    )
    taxonomy, report = select(property_stats("page", [1]), users)
    assert taxonomy.user_properties == (UserProperty("plan", ("free", "pro", "team")),)
    assert report["identifier_like_user_properties"] == ["email"]


def test_values_too_long_or_odd_to_be_features_still_count_as_uses():
    # 95 file paths used 10 times each (stored as the rollup's one long value, or too odd to quote) and a default used
    # 50 times: the default covers 5% of uses, so the property is a path, not a category.
    files = pd.DataFrame(
        {"event_type": "view", "prop_key": "file", "prop_value": [LONG_VALUE, "C:\\x", "none"], "n": [900, 50, 50]}
    )
    bios = pd.DataFrame({"prop_key": "bio", "value": ["x" * 150, "n/a"], "users": [98, 2]})
    taxonomy, report = select(pd.concat([files, property_stats("page", [40, 30], event_type="view")]), bios)
    assert [p.key for p in taxonomy.event_properties] == ["page"]
    assert report["identifier_like_event_properties"] == ["view.file (3 values, the top 1 cover 5.0% of uses)"]
    assert taxonomy.user_properties == () and report["identifier_like_user_properties"] == ["bio"]


def test_an_event_property_whose_key_cannot_be_a_feature_is_left_out():
    # A key with a backslash cannot be quoted in the feature SQL: choosing it failed every training run.
    taxonomy, report = select(pd.concat([property_stats("C:\\dir", [10, 5]), property_stats("page", [4], event_type="view")]))
    assert [p.key for p in taxonomy.event_properties] == ["page"]
    assert report["identifier_like_event_properties"][0].startswith("purchase.C:\\dir ")
    feature_query(taxonomy, as_of_hour=1000)  # the chosen taxonomy makes a query
