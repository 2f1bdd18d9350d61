"""Where everything lives in the store, relative to its root. One place, tested with exact paths.

Hours appear as `hour=YYYY-MM-DDTHH` (no ':' as in Dagster's keys, which S3 and Spark paths handle badly), so the
store also reads as a Hive-partitioned lake.
"""

from datetime import datetime

from automl_assets.core.timewin import day_token, hour_from_token, hour_token

ROLLUP_KINDS = ("counts", "props", "users")
HOUR_PREFIX = "hour="


def hour_folder(hour_start: datetime) -> str:
    """The name an hour goes by in the store: `hour=YYYY-MM-DDTHH`."""
    return f"{HOUR_PREFIX}{hour_token(hour_start)}"


def folder_hour(name: str) -> datetime:
    """The hour a stored `hour=…` name stands for."""
    return hour_from_token(name.removeprefix(HOUR_PREFIX))


def landing() -> tuple[str, ...]:
    return ("landing",)


def staging(file_digest: str) -> tuple[str, ...]:
    return ("staging", file_digest)


def staged_manifest(file_digest: str) -> tuple[str, ...]:
    """Written last when a file is staged: its presence means the file's chunks are complete."""
    return (*staging(file_digest), "manifest.json")


def staged_hour(file_digest: str, hour_start: datetime) -> tuple[str, ...]:
    return (*staging(file_digest), f"{hour_folder(hour_start)}.parquet")


def landing_index(path_key: str) -> tuple[str, ...]:
    """What was staged from one landing file (`path_key`: a digest of its path), and as of which size and time."""
    return ("staging_index", f"{path_key}.json")


def quarantine(file_digest: str) -> tuple[str, ...]:
    return ("quarantine", f"{file_digest}.parquet")


def events_root() -> tuple[str, ...]:
    return ("events",)


def events_hour(hour_start: datetime) -> tuple[str, ...]:
    return ("events", hour_folder(hour_start), "events.parquet")


def hourly_rollups_root() -> tuple[str, ...]:
    return ("rollups",)


def rollup_root(kind: str) -> tuple[str, ...]:
    if kind not in ROLLUP_KINDS:
        raise ValueError(f"unknown rollup kind {kind!r}; expected one of {ROLLUP_KINDS}")
    return (*hourly_rollups_root(), kind)


def rollup_hour(kind: str, hour_start: datetime) -> tuple[str, ...]:
    return (*rollup_root(kind), hour_folder(hour_start))


def daily_rollups_root() -> tuple[str, ...]:
    return ("rollups_daily",)


def rollup_days_root(kind: str) -> tuple[str, ...]:
    """UTC days of a rollup kind in one file each, which stands for every hour of its day (docs/design.md)."""
    rollup_root(kind)  # validates the kind
    return (*daily_rollups_root(), kind)


def rollup_day(kind: str, day: datetime) -> tuple[str, ...]:
    return (*rollup_days_root(kind), f"day={day_token(day)}")


def specs_root() -> tuple[str, ...]:
    return ("specs",)


def spec_file(prediction: str) -> tuple[str, ...]:
    return (*specs_root(), f"{prediction}.yaml")


def retired_spec_file(prediction: str) -> tuple[str, ...]:
    return (*specs_root(), "retired", f"{prediction}.yaml")


def prediction_asset_root(prediction: str, asset: str) -> tuple[str, ...]:
    return ("predictions", prediction, asset)


def prediction_asset(prediction: str, asset: str, hour_start: datetime, *name: str) -> tuple[str, ...]:
    return (*prediction_asset_root(prediction, asset), hour_folder(hour_start), *name)


def latest_scores(prediction: str) -> tuple[str, ...]:
    return ("scores_latest", f"prediction={prediction}", "latest.parquet")
