"""All time arithmetic of the project: partitions, cutoffs, windows. Every window is half-open, [start, end).

Partition (hour H, prediction p) is "as of A = H + 1h": only events with event_time < A exist for it.
Training uses cutoff C = A - offset - horizon: features and cohort as of C, label in [C + offset, A).
Inference uses features and cohort as of A and predicts [A + offset, A + offset + horizon).
Training may stack earlier snapshots C - k weeks (k = 1, 2, ...), each with its own label window
[C - k weeks + offset, A - k weeks): every label window ends at or before A.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)
HOURS_PER_DAY = 24
HOUR_KEY_FORMAT = "%Y-%m-%d-%H:%M"  # Dagster's hourly partition key format
_DURATION = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNIT = {"h": HOUR, "d": DAY, "w": WEEK}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_duration(text: str) -> timedelta:
    """'12h', '7d' or '2w' -> timedelta. Whole hours only, because partitions are hours."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"'{text}' is not a duration; write a whole number followed by h, d or w, e.g. '7d'.")
    return int(match.group(1)) * _UNIT[match.group(2)]


def format_duration(delta: timedelta) -> str:
    hours = int(delta / HOUR)
    if hours % 168 == 0 and hours:
        return f"{hours // 168}w"
    if hours % 24 == 0 and hours:
        return f"{hours // 24}d"
    return f"{hours}h"


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment} has no time zone; the project works in UTC and needs aware datetimes.")
    return moment.astimezone(timezone.utc)


def floor_hour(moment: datetime) -> datetime:
    return utc(moment).replace(minute=0, second=0, microsecond=0)


def last_ended_hour(now: datetime) -> datetime:
    """The start of the newest hour that is over at `now` (the hour under way is not)."""
    return floor_hour(now) - HOUR


def hour_from_key(key: str) -> datetime:
    """Start of the hour named by a Dagster hourly partition key ('2026-03-01-05:00')."""
    return datetime.strptime(key, HOUR_KEY_FORMAT).replace(tzinfo=timezone.utc)


def hour_key(hour_start: datetime) -> str:
    return floor_hour(hour_start).strftime(HOUR_KEY_FORMAT)


def hour_token(hour_start: datetime) -> str:
    """Storage-path form of an hour: no ':' so that it is valid in local paths, S3 keys and Spark paths."""
    return floor_hour(hour_start).strftime("%Y-%m-%dT%H")


def hour_from_token(token: str) -> datetime:
    return datetime.strptime(token, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)


def day_token(moment: datetime) -> str:
    """Storage-path form of the UTC day containing `moment`."""
    return utc(moment).strftime("%Y-%m-%d")


def day_start(moment: datetime) -> datetime:
    """Midnight UTC of the day containing `moment`."""
    return floor_hour(moment).replace(hour=0)


def hours_by_day(hours: list[datetime]) -> dict[datetime, list[datetime]]:
    """`hours` grouped by the UTC day they fall in (keyed by its midnight), in their order. A day is whole when all
    HOURS_PER_DAY of its hours are in its group."""
    days: dict[datetime, list[datetime]] = {}
    for hour in hours:
        days.setdefault(day_start(hour), []).append(hour)
    return days


def epoch_hour(moment: datetime) -> int:
    """Hours since the epoch of the hour containing `moment`: the integer time axis of the rollups."""
    return int((floor_hour(moment) - _EPOCH) // HOUR)


def from_epoch_hour(index: int) -> datetime:
    return _EPOCH + index * HOUR


def hour_ranges(hours: Iterable[datetime], split_at: timedelta) -> list[tuple[datetime, datetime]]:
    """[start, end) ranges covering the hour starts `hours`, in order; a range ends where the next hour starts
    `split_at` or more after its end."""
    ranges: list[tuple[datetime, datetime]] = []
    for hour in sorted(hours):
        if ranges and hour - ranges[-1][1] < split_at:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hour + HOUR))
        else:
            ranges.append((hour, hour + HOUR))
    return ranges


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Starts of the hours covering [start, end); both must be on the hour."""
    for moment in (start, end):
        if floor_hour(moment) != utc(moment):
            raise ValueError(f"{moment} is not on the hour.")
    count = int((utc(end) - utc(start)) // HOUR)
    return [utc(start) + i * HOUR for i in range(max(count, 0))]


@dataclass(frozen=True)
class PartitionTimes:
    """The moments one (hour, prediction) partition works with."""

    hour_start: datetime
    as_of: datetime  # A: inference cutoff; nothing at or after A is read
    train_cutoff: datetime  # C = A - offset - horizon
    label_start: datetime  # C + offset
    label_end: datetime  # C + offset + horizon == A
    train_lookback_start: datetime  # C - lookback

    @property
    def predicts(self) -> tuple[datetime, datetime]:
        """The window the inference scores are about: [A + offset, A + offset + horizon)."""
        offset = self.label_start - self.train_cutoff
        horizon = self.label_end - self.label_start
        return self.as_of + offset, self.as_of + offset + horizon


def partition_times(hour_start: datetime, horizon: timedelta, offset: timedelta, lookback: timedelta) -> PartitionTimes:
    hour_start = utc(hour_start)
    if floor_hour(hour_start) != hour_start:
        raise ValueError(f"{hour_start} is not the start of an hour.")
    as_of = hour_start + HOUR
    cutoff = as_of - offset - horizon
    return PartitionTimes(
        hour_start=hour_start,
        as_of=as_of,
        train_cutoff=cutoff,
        label_start=cutoff + offset,
        label_end=cutoff + offset + horizon,
        train_lookback_start=cutoff - lookback,
    )


@dataclass(frozen=True)
class TrainingSnapshot:
    """One stacked training cutoff: features and cohort as of `cutoff`, label in [label_start, label_end)."""

    weeks_back: int
    cutoff: datetime
    label_start: datetime
    label_end: datetime


def training_snapshots(times: PartitionTimes, count: int, reads_before: timedelta, history_start: datetime | None) -> list[TrainingSnapshot]:
    """C, C - 1 week, ... (at most `count`), newest first. A snapshot is a week apart so that its cutoff falls on the
    same weekday and hour as the inference cutoff (weekly rhythms line up). Older snapshots are kept only while what
    they read (`reads_before` their cutoff) lies inside the history; the newest is always kept, and the
    training-eligibility check reports when its history is short."""
    snapshots = []
    for weeks_back in range(count):
        shift = weeks_back * WEEK
        cutoff = times.train_cutoff - shift
        if weeks_back and (history_start is None or cutoff - reads_before < history_start):
            break
        snapshots.append(TrainingSnapshot(weeks_back, cutoff, times.label_start - shift, times.label_end - shift))
    return snapshots


def is_cadence_hour(as_of: datetime, every: timedelta) -> bool:
    """True when `as_of` lies on the cadence grid counted from the epoch (daily cadence -> midnight UTC)."""
    return (utc(as_of) - _EPOCH) % every == timedelta(0)
