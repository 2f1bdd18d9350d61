from datetime import timedelta

import pytest

from automl_assets.core.timewin import (
    HOUR,
    epoch_hour,
    format_duration,
    from_epoch_hour,
    hour_from_key,
    hour_key,
    hour_ranges,
    hour_token,
    hours_between,
    is_cadence_hour,
    last_ended_hour,
    parse_duration,
    partition_times,
    training_snapshots,
)
from tests.conftest import utc


def test_durations_round_trip_and_reject_garbage():
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("2w") == timedelta(days=14)
    assert parse_duration("12h") == timedelta(hours=12)
    assert [format_duration(parse_duration(t)) for t in ("7d", "2w", "36h")] == ["1w", "2w", "36h"]
    for bad in ("7", "1.5d", "7m", "", "-1d"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_partition_times_follow_the_design():
    hour = utc(2026, 3, 10, 11)
    times = partition_times(hour, horizon=timedelta(days=7), offset=timedelta(hours=2), lookback=timedelta(weeks=8))
    assert times.as_of == utc(2026, 3, 10, 12)  # A = H + 1h
    assert times.train_cutoff == utc(2026, 3, 3, 10)  # C = A - offset - horizon
    assert times.label_start == utc(2026, 3, 3, 12)  # C + offset
    assert times.label_end == times.as_of  # the label window ends at A: nothing after A is read
    assert times.train_lookback_start == times.train_cutoff - timedelta(weeks=8)
    assert times.predicts == (utc(2026, 3, 10, 14), utc(2026, 3, 17, 14))


def test_training_snapshots_are_weeks_apart_and_stop_where_history_does():
    times = partition_times(utc(2026, 3, 10, 11), horizon=timedelta(days=7), offset=timedelta(0), lookback=timedelta(weeks=8))
    reads = timedelta(weeks=8)
    everything = training_snapshots(times, 12, reads, history_start=utc(2020, 1, 1))
    assert [s.weeks_back for s in everything] == list(range(12))
    for snapshot in everything:
        assert snapshot.cutoff == times.train_cutoff - timedelta(weeks=snapshot.weeks_back)
        assert (snapshot.label_start, snapshot.label_end) == (snapshot.cutoff, snapshot.cutoff + timedelta(days=7))
        assert snapshot.label_end <= times.as_of  # no label window reaches past A
    # History from exactly what snapshot 2 reads: snapshots 0-2; one hour later: 0-1.
    start = times.train_cutoff - timedelta(weeks=2) - reads
    assert len(training_snapshots(times, 12, reads, history_start=start)) == 3
    assert len(training_snapshots(times, 12, reads, history_start=start + HOUR)) == 2
    # The newest snapshot is kept whatever the history (the eligibility check reports a short one).
    assert [s.weeks_back for s in training_snapshots(times, 12, reads, history_start=None)] == [0]
    assert len(training_snapshots(times, 1, reads, history_start=utc(2020, 1, 1))) == 1


def test_partition_times_reject_a_time_inside_an_hour():
    with pytest.raises(ValueError, match="not the start of an hour"):
        partition_times(utc(2026, 3, 10, 11, 30), timedelta(days=1), timedelta(0), timedelta(weeks=1))


def test_keys_tokens_and_epoch_hours_agree():
    hour = utc(2026, 3, 1, 5)
    assert hour_key(hour) == "2026-03-01-05:00"
    assert hour_from_key("2026-03-01-05:00") == hour
    assert hour_token(hour) == "2026-03-01T05"
    assert from_epoch_hour(epoch_hour(hour)) == hour
    # The last microsecond of an hour still belongs to it; the next hour starts a new index.
    assert epoch_hour(hour + HOUR - timedelta(microseconds=1)) == epoch_hour(hour)
    assert epoch_hour(hour + HOUR) == epoch_hour(hour) + 1


def test_hour_ranges_are_half_open():
    assert hours_between(utc(2026, 3, 1, 22), utc(2026, 3, 2, 1)) == [utc(2026, 3, 1, 22), utc(2026, 3, 1, 23), utc(2026, 3, 2, 0)]
    assert hours_between(utc(2026, 3, 2), utc(2026, 3, 2)) == []


def test_hours_cluster_into_ranges_split_at_a_gap():
    day = timedelta(days=1)
    assert hour_ranges([], day) == []
    # Unordered, repeated, and a gap of 23 hours between the end of one range and the next hour: one range.
    hours = [utc(2026, 3, 2, 4), utc(2026, 3, 1, 5), utc(2026, 3, 2, 4), utc(2026, 3, 1, 4)]
    assert hour_ranges(hours, day) == [(utc(2026, 3, 1, 4), utc(2026, 3, 2, 5))]
    # A gap of exactly `split_at` after a range's end splits it.
    assert hour_ranges([utc(2026, 3, 1, 4), utc(2026, 3, 2, 5)], day) == [
        (utc(2026, 3, 1, 4), utc(2026, 3, 1, 5)),
        (utc(2026, 3, 2, 5), utc(2026, 3, 2, 6)),
    ]


def test_cadence_grid():
    assert is_cadence_hour(utc(2026, 3, 2), timedelta(days=1))
    assert not is_cadence_hour(utc(2026, 3, 2, 1), timedelta(days=1))
    assert is_cadence_hour(utc(2026, 3, 2, 1), HOUR)


def test_the_last_ended_hour_is_never_the_one_under_way():
    assert last_ended_hour(utc(2026, 3, 1, 5)) == utc(2026, 3, 1, 4)  # 05:00 sharp: 04:00 has just ended
    assert last_ended_hour(utc(2026, 3, 1, 5) + timedelta(minutes=59, microseconds=999_999)) == utc(2026, 3, 1, 4)
    assert last_ended_hour(utc(2026, 3, 2, 0)) == utc(2026, 3, 1, 23)  # across midnight
