"""The event store: raw files landed under `landing/` become hour partitions of canonical events, then hourly
rollups (user x event counts and property values), the incremental building block of every feature."""

import dagster as dg

from automl_assets import checks
from automl_assets.core import event_store, layout
from automl_assets.core.timewin import HOUR, hours_between
from automl_assets.partitions import hour_range, hourly_partitions
from resources.engine import EngineResource
from resources.storage import LocalStorage

# A backfill of many hours is one run (and one query per rollup kind), not one run per hour.
RANGE_POLICY = dg.BackfillPolicy.single_run()
# Both assets rewrite hour files other runs read: the instance's dagster.yaml lets one run of this pool in at a time.
EVENT_STORE_POOL = "event_store"
FRESHNESS_LIMIT = 3 * HOUR  # an hour's files may arrive an hour or two late; three hours without any is an outage


def freshness(storage, covered_until) -> dg.AssetCheckResult:
    """Whether events keep arriving: the newest stored hour against the end of the hours this run covered."""
    newest_hour = event_store.newest_stored_hour(storage)
    newest = newest_hour + HOUR if newest_hour else None
    lag = (covered_until - newest) if newest else None
    passed = lag is not None and lag <= FRESHNESS_LIMIT
    return dg.AssetCheckResult(
        check_name=checks.EVENTS_FRESH.name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"The newest events end at {newest.isoformat()}, {lag} before the end of the hours covered."
        if newest
        else "The event store is empty: drop files under landing/ or run `automl ingest`.",
        metadata={"lag_hours": (lag / HOUR) if lag is not None else -1.0},
    )


def readable(unreadable: list[str]) -> dg.AssetCheckResult:
    """Files under landing/ that cannot be read are left out (the others are ingested) and fail this check until
    they are replaced, removed, or given the mapping they lack."""
    return dg.AssetCheckResult(
        check_name=checks.LANDING_READABLE.name,
        passed=not unreadable,
        severity=dg.AssetCheckSeverity.ERROR,
        description=" ".join(unreadable) if unreadable else "Every file under landing/ was read.",
        metadata={"unreadable_files": len(unreadable)},
    )


@dg.asset(
    partitions_def=hourly_partitions,
    backfill_policy=RANGE_POLICY,
    pool=EVENT_STORE_POOL,
    group_name="event_store",
    kinds={"parquet"},
    check_specs=[checks.EVENTS_FRESH, checks.LANDING_READABLE],
    description="Canonical events of each UTC hour, deduplicated on insert_id, from the files under landing/.",
)
def events(context: dg.AssetExecutionContext, storage: LocalStorage) -> dg.MaterializeResult:
    start, end = hour_range(context)
    hours = hours_between(start, end)
    staged = event_store.stage_landing(storage)
    new_files = [m for m in staged if m["newly_staged"]]
    unreadable = [m["error"] for m in staged if "error" in m]
    manifests = event_store.staged_manifests(storage)
    totals = event_store.merge_hours(storage, hours, manifests)
    quarantined = event_store.quarantined_in_hours(manifests, hours)
    if quarantined:
        context.log.warning(f"quarantined records by reason: {quarantined} (see {storage.path('quarantine')})")
    for error in unreadable:
        context.log.error(error)
    return dg.MaterializeResult(
        check_results=[freshness(storage, end), readable(unreadable)],
        metadata={
            "hours": dg.MetadataValue.int(len(hours)),
            "hours_with_events": totals.get("hours_with_events", 0),
            "events": totals.get("events", 0),
            "new_events": totals.get("new_events", 0),
            "duplicates_dropped": totals.get("duplicates_dropped", 0),
            "files_staged_now": len(new_files),
            "quarantined": dg.MetadataValue.json(quarantined),
            "quarantined_total": sum(quarantined.values()),
            "unreadable_files": len(unreadable),
            "path": dg.MetadataValue.path(storage.path("events")),
        }
    )


@dg.asset(
    partitions_def=hourly_partitions,
    backfill_policy=RANGE_POLICY,
    pool=EVENT_STORE_POOL,
    deps=[events],
    group_name="event_store",
    kinds={"duckdb", "spark", "parquet"},
    description="Per hour: events per user and event type, event-property value counts and user-property "
    "first/last values. Features sum these, so an hourly refresh reads one new hour of raw events. A day that is "
    "over is stored as one file per kind (rollups_daily/), which the feature queries read instead of 24 hourly files.",
)
def hourly_rollups(
    context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource
) -> dg.MaterializeResult:
    start, end = hour_range(context)
    rows = engine.engine().build_rollups(storage, hours_between(start, end))
    return dg.MaterializeResult(
        metadata={
            "hours": len(hours_between(start, end)),
            **{f"{kind}_rows": count for kind, count in rows.items()},
            "path": dg.MetadataValue.path(storage.path(*layout.hourly_rollups_root())),
            "days_path": dg.MetadataValue.path(storage.path(*layout.daily_rollups_root())),
        }
    )
