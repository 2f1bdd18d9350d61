"""Schedules and sensors, evaluated as the daemon would (build_schedule_context / build_sensor_context)."""

import gzip
import json
import uuid
from datetime import timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from automl_assets.core import event_store, layout
from automl_assets.core.event_store import write_events
from automl_assets.core.spec import parse_spec
from automl_assets.core.timewin import HOUR
from automl_assets.partitions import prediction_hour_key
from automl_assets.predictions import SCOPE_TAG, active_predictions, model_in_force, store_spec
from automl_assets.runs import RANGE_END_TAG, RANGE_START_TAG
from resources.spec_folder import SpecFolder
from schedules import (
    REASON_TAG,
    daily_scoring,
    drift,
    hourly_ingest,
    ingest_scoring_requests,
    ingested_events,
    new_raw_events,
    prediction_specs,
    retrain_due,
)
from tests.conftest import events_table, fake_model, utc

SPEC = "name: buy_7d\noutcome:\n  event: purchase\nhorizon: 7d\n"
NEWEST = utc(2026, 3, 2, 4)


@pytest.fixture
def store_with_events(storage):
    write_events(storage, events_table([{"user_id": "u1", "event_type": "view", "event_time": NEWEST.replace(minute=3)}]))
    return storage


def sensor_context(instance, storage, cursor=None, folder=None):
    resources = {"storage": storage, "spec_folder": SpecFolder(path=str(folder or storage.base / "nowhere"))}
    return dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)


def test_spec_sensor_registers_trains_updates_and_retires(tmp_path, store_with_events):
    storage = store_with_events
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "buy_7d.yaml").write_text(SPEC)
    with dg.instance_for_test() as instance:
        first = prediction_specs(sensor_context(instance, storage, folder=folder))
        assert first.dynamic_partitions_requests[0].partition_keys == ["buy_7d"]
        (request,) = first.run_requests
        assert request.job_name == "prediction_job"
        assert request.partition_key == prediction_hour_key("buy_7d", NEWEST)
        assert request.tags[SCOPE_TAG] == "cohort"
        assert active_predictions(storage) == ["buy_7d"]

        instance.add_dynamic_partitions("prediction", ["buy_7d"])
        unchanged = prediction_specs(sensor_context(instance, storage, first.cursor, folder))
        assert not unchanged.run_requests

        (folder / "buy_7d.yaml").write_text(SPEC + "lookback_weeks: 4\n")
        changed = prediction_specs(sensor_context(instance, storage, first.cursor, folder))
        assert len(changed.run_requests) == 1 and not changed.dynamic_partitions_requests
        assert "lookback_weeks: 4" in storage.read_bytes(*layout.spec_file("buy_7d")).decode()

        (folder / "buy_7d.yaml").unlink()
        removed = prediction_specs(sensor_context(instance, storage, changed.cursor, folder))
        assert not removed.run_requests
        assert active_predictions(storage) == []
        assert storage.exists(*layout.retired_spec_file("buy_7d"))
        assert instance.has_dynamic_partition("prediction", "buy_7d")  # history stays


def test_spec_sensor_does_not_retrain_a_spec_registered_as_it_is_with_a_model(tmp_path, store_with_events):
    """The demo (or `automl register`) registered and trained the spec; the sensor's first look at the same file,
    when the UI starts, registers its partitions and trains nothing. Without a model it trains."""
    storage = store_with_events
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "buy_7d.yaml").write_text(SPEC)
    store_spec(storage, parse_spec({"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}))
    with dg.instance_for_test() as instance:
        assert len(prediction_specs(sensor_context(instance, storage, folder=folder)).run_requests) == 1
        fake_model(storage, "buy_7d", NEWEST - HOUR)
        seen = prediction_specs(sensor_context(instance, storage, folder=folder))
        assert not seen.run_requests and seen.dynamic_partitions_requests[0].partition_keys == ["buy_7d"]
        assert "registered as it is and has a model in force" in seen.skip_reason.skip_message


def test_spec_sensor_reports_an_invalid_spec_and_registers_nothing(tmp_path, store_with_events):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "bad.yaml").write_text("name: bad\noutcome: {event: x}\nhorizon: soon\n")
    (folder / "revenue.yaml").write_text("name: revenue\noutcome: {sum: revenue}\nhorizon: 7d\n")  # valid, not trainable
    with dg.instance_for_test() as instance:
        result = prediction_specs(sensor_context(instance, store_with_events, folder=folder))
    assert not result.run_requests and not result.dynamic_partitions_requests
    assert "horizon: 'soon' is not a duration" in result.skip_reason.skip_message
    assert "revenue: outcome.sum (a regression target) is not supported yet" in result.skip_reason.skip_message
    assert not store_with_events.exists(*layout.spec_file("revenue"))


def test_hourly_schedule_ingests_the_hour_that_just_ended():
    context = dg.build_schedule_context(scheduled_execution_time=utc(2026, 3, 2, 5, 5))
    request = hourly_ingest(context)
    assert request.tags[RANGE_START_TAG] == request.tags[RANGE_END_TAG] == "2026-03-02-04:00"


def test_daily_schedule_scores_whole_cohorts_with_the_model_in_force(store_with_events):
    storage = store_with_events
    storage.write_bytes(parse_spec({"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}).to_yaml().encode(), *layout.spec_file("buy_7d"))
    context = dg.build_schedule_context(scheduled_execution_time=utc(2026, 3, 2, 0, 30), resources={"storage": storage})
    assert isinstance(daily_scoring(context), dg.SkipReason)  # no model yet
    fake_model(storage, "buy_7d", utc(2026, 3, 1, 12))
    (request,) = daily_scoring(dg.build_schedule_context(scheduled_execution_time=utc(2026, 3, 2, 0, 30), resources={"storage": storage}))
    assert request.job_name == "scoring_job"
    assert request.partition_key == prediction_hour_key("buy_7d", utc(2026, 3, 1, 23))
    assert request.tags[SCOPE_TAG] == "cohort"


def test_retraining_follows_the_cadence(store_with_events):
    storage = store_with_events
    storage.write_bytes(parse_spec({"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}).to_yaml().encode(), *layout.spec_file("buy_7d"))
    assert retrain_due(storage, "buy_7d", utc(2026, 3, 2, 5))  # no model yet
    fake_model(storage, "buy_7d", utc(2026, 3, 1, 23))
    assert not retrain_due(storage, "buy_7d", utc(2026, 3, 2, 5))
    assert retrain_due(storage, "buy_7d", utc(2026, 3, 2, 23))  # daily cadence: the hour ending at midnight
    fake_model(storage, "buy_7d", utc(2026, 3, 2, 6), promoted=False)
    assert not retrain_due(storage, "buy_7d", utc(2026, 3, 2, 7))
    fake_model(storage, "buy_7d", utc(2026, 3, 2, 23))
    assert not retrain_due(storage, "buy_7d", utc(2026, 3, 2, 23))  # trained at that hour: another ingest rescores


def test_each_ingest_scores_the_newest_hour_that_is_over(store_with_events):
    storage = store_with_events
    store_spec(storage, parse_spec({"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}))
    fake_model(storage, "buy_7d", utc(2026, 3, 2, 3))
    now = utc(2026, 3, 2, 5) + timedelta(minutes=20)
    with dg.instance_for_test() as instance:
        first = ingest_scoring_requests(storage, "aaaaaaaa-1", utc(2026, 3, 2, 4), now, instance)
        late = ingest_scoring_requests(storage, "bbbbbbbb-2", utc(2026, 3, 2, 4), now, instance)
        assert [r.partition_key for r in first + late] == [prediction_hour_key("buy_7d", utc(2026, 3, 2, 4))] * 2
        assert first[0].run_key != late[0].run_key  # late events of an hour already scored score it again
        assert first[0].job_name == "scoring_job"
        # A file reaching into 05:00, still under way at 05:20: the newest hour that is over is scored.
        (unfinished,) = ingest_scoring_requests(storage, "cccccccc-3", utc(2026, 3, 2, 5), now, instance)
        assert unfinished.partition_key == prediction_hour_key("buy_7d", utc(2026, 3, 2, 4))
        assert unfinished.tags[SCOPE_TAG] == "active"
        # Late events in an hour the daily run scored for the whole cohort: it is rescored whole, not overwritten by
        # the users active in it.
        storage.write_json({"scope": "cohort"}, *layout.prediction_asset("buy_7d", "cohort", utc(2026, 3, 2, 4), "scope.json"))
        (daily,) = ingest_scoring_requests(storage, "dddddddd-4", utc(2026, 3, 2, 4), now, instance)
        assert daily.tags[SCOPE_TAG] == "cohort"

        # 23:00, when the daily retrain is due: the first ingest trains; a second ingest of the hour while that
        # training is queued or running scores (after it, one run of a partition at a time), it does not train again.
        midnight = utc(2026, 3, 3)
        (trains,) = ingest_scoring_requests(storage, "eeeeeeee-5", midnight - HOUR, midnight, instance)
        assert trains.job_name == "prediction_job"
        partition = str(prediction_hour_key("buy_7d", midnight - HOUR))
        running = dg.DagsterRun(job_name="prediction_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": partition})
        instance.add_run(running)
        (second,) = ingest_scoring_requests(storage, "ffffffff-6", midnight - HOUR, midnight, instance)
        assert second.job_name == "scoring_job"
        instance.report_run_failed(running)  # it failed: the next ingest trains again
        (retry,) = ingest_scoring_requests(storage, "gggggggg-7", midnight - HOUR, midnight, instance)
        assert retry.job_name == "prediction_job"

        # A re-export of last month: no model was in force then and a later one is, so nothing is scored or trained.
        assert ingest_scoring_requests(storage, "hhhhhhhh-8", utc(2026, 2, 2, 14), now, instance) == []


def test_ingests_from_the_asset_graph_are_scored_too():
    """The UI's Materialize and backfills of `events` run as Dagster's asset job; scoring runs are not ingests."""
    def run(job_name, selection=None):
        return dg.DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), asset_selection=selection)

    assert ingested_events(run("event_store_job"))
    assert ingested_events(run("__ASSET_JOB", frozenset({dg.AssetKey("events"), dg.AssetKey("hourly_rollups")})))
    assert not ingested_events(run("__ASSET_JOB", frozenset({dg.AssetKey("scores")})))
    assert not ingested_events(run("scoring_job"))


def test_a_spec_that_asks_another_question_does_not_keep_the_old_model(store_with_events):
    """A spec re-registered with another outcome: the old model neither scores it nor is the bar its first model
    must clear at the promotion gate, and a retrain is due at once. A change that keeps the target keeps the model."""
    storage = store_with_events
    purchase = {"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}
    store_spec(storage, parse_spec(purchase))
    fake_model(storage, "buy_7d", utc(2026, 3, 1, 23))
    assert model_in_force(storage, "buy_7d", utc(2026, 3, 2, 5)) == utc(2026, 3, 1, 23)
    store_spec(storage, parse_spec({**purchase, "outcome": {"event": "support_ticket"}}))
    assert model_in_force(storage, "buy_7d", utc(2026, 3, 2, 5)) is None
    assert retrain_due(storage, "buy_7d", utc(2026, 3, 2, 5))
    store_spec(storage, parse_spec({**purchase, "lookback_weeks": 4}))
    assert model_in_force(storage, "buy_7d", utc(2026, 3, 2, 5)) == utc(2026, 3, 1, 23)


def test_new_raw_files_trigger_one_ingest_run_over_their_hours(storage):
    folder = storage.base / "landing" / "amplitude"
    folder.mkdir(parents=True)
    lines = [
        {"event_type": "view", "user_id": "u1", "event_time": "2026-03-02 04:59:59", "insert_id": "a"},
        {"event_type": "view", "user_id": "u1", "event_time": "2026-03-02 06:00:00", "insert_id": "b"},
        # Before the first partition, and in an hour not over yet: staged, but outside the run's range.
        {"event_type": "view", "user_id": "u1", "event_time": "1970-01-01 00:00:01", "insert_id": "c"},
        {"event_type": "view", "user_id": "u1", "event_time": "2099-01-01 00:00:00", "insert_id": "d"},
    ]
    with gzip.open(folder / "export.json.gz", "wt") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    with dg.instance_for_test() as instance:
        result = new_raw_events(sensor_context(instance, storage))
        (request,) = result.run_requests
        assert request.job_name == "event_store_job"
        assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("2026-03-02-04:00", "2026-03-02-06:00")
        again = new_raw_events(sensor_context(instance, storage, result.cursor))
        assert isinstance(again, dg.SkipReason)
        # The cursor keeps a short key per file kept under landing/, and forgets a file once it is removed.
        assert [len(key) for key in json.loads(result.cursor)] == [16]
        # A cursor of the older form (the markers themselves) is read as the same keys: nothing is ingested again.
        old_form = json.dumps([event_store.landing_marker(folder / "export.json.gz")])
        assert isinstance(new_raw_events(sensor_context(instance, storage, old_form)), dg.SkipReason)
        # A file removed from landing/ leaves the cursor (here while another arrives) ...
        (folder / "export.json.gz").unlink()
        with gzip.open(folder / "next.json.gz", "wt") as handle:
            handle.write(json.dumps({"event_type": "view", "user_id": "u2", "event_time": "2026-03-02 07:00:00"}) + "\n")
        replaced = new_raw_events(sensor_context(instance, storage, result.cursor))
        assert [r.tags[RANGE_START_TAG] for r in replaced.run_requests] == ["2026-03-02-07:00"]
        assert len(json.loads(replaced.cursor)) == 1 and set(json.loads(replaced.cursor)).isdisjoint(json.loads(result.cursor))
        # ... but a listing that finds no file at all keeps the cursor whole.
        (folder / "next.json.gz").unlink()
        assert isinstance(new_raw_events(sensor_context(instance, storage, replaced.cursor)), dg.SkipReason)


def test_an_unreadable_landing_file_does_not_stop_the_others(storage):
    """A file that cannot be read is logged and skipped, the others are ingested; it is read again once it or its
    folder's mapping changes. One event from weeks ago gets a run of its own, not a run over the weeks between."""
    amplitude, exports = storage.base / "landing" / "amplitude", storage.base / "landing" / "crm"
    amplitude.mkdir(parents=True)
    exports.mkdir()
    (amplitude / "broken.json.gz").write_bytes(b"not gzip at all")
    lines = [
        {"event_type": "view", "user_id": "u1", "event_time": "2026-01-20 10:00:00", "insert_id": "old"},
        {"event_type": "view", "user_id": "u1", "event_time": "2026-03-02 04:10:00", "insert_id": "a"},
    ]
    with gzip.open(amplitude / "export.json.gz", "wt") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    (exports / "crm.csv").write_text("uid,ts,name\nu2,2026-03-02T04:20:00Z,signup\n")
    with dg.instance_for_test() as instance:
        result = new_raw_events(sensor_context(instance, storage))
        ranges = [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in result.run_requests]
        assert ranges == [("2026-01-20-10:00", "2026-01-20-10:00"), ("2026-03-02-04:00", "2026-03-02-04:00")]
        assert len({r.run_key for r in result.run_requests}) == 2
        assert isinstance(new_raw_events(sensor_context(instance, storage, result.cursor)), dg.SkipReason)
        # The CSV lacked its mapping: adding it has the file read again, the unchanged broken file is not.
        (exports / "_mapping.json").write_text(json.dumps({"user_id": "uid", "event_time": "ts", "event_type": "name"}))
        fixed = new_raw_events(sensor_context(instance, storage, result.cursor))
        assert [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in fixed.run_requests] == [("2026-03-02-04:00", "2026-03-02-04:00")]


def test_drift_sensor_requests_a_retrain_and_says_why(store_with_events):
    storage = store_with_events
    storage.write_bytes(parse_spec({"name": "buy_7d", "outcome": {"event": "purchase"}, "horizon": "7d"}).to_yaml().encode(), *layout.spec_file("buy_7d"))
    trained, latest = utc(2026, 3, 1, 0), NEWEST
    fake_model(storage, "buy_7d", trained)
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"user_id": [f"u{i}" for i in range(2000)], "label": 0, "f__view__w1": rng.poisson(2, 2000).astype(float)})
    # An older stacked snapshot with another distribution: the reference is the newest snapshot alone.
    older = train.assign(f__view__w1=rng.poisson(9, 2000).astype(float))
    stacked = pd.concat([train.assign(snapshot=0), older.assign(snapshot=1)], ignore_index=True)
    shifted = train.drop(columns="label").assign(f__view__w1=rng.poisson(9, 2000).astype(float))
    # The whole cohort as of `latest`, and after it an hourly run's matrix: only the users active in its hour.
    matrices = ((trained, "train", stacked, None), (latest, "infer", train.drop(columns="label"), "cohort"), (latest + HOUR, "infer", shifted, "active"))

    def write_matrix(hour, role, frame, scope):
        path = storage.base.joinpath(*layout.prediction_asset("buy_7d", "feature_matrix", hour, role, "matrix.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path)
        if scope:
            storage.write_json({"scope": scope}, *layout.prediction_asset("buy_7d", "cohort", hour, "scope.json"))

    for matrix in matrices:
        write_matrix(*matrix)
    with dg.instance_for_test() as instance:
        # Same distribution in the whole cohort; the hourly run's users are another population, never compared.
        assert not drift(sensor_context(instance, storage)).run_requests
        shifted.to_parquet(storage.base.joinpath(*layout.prediction_asset("buy_7d", "feature_matrix", latest, "infer", "matrix.parquet")))
        result = drift(sensor_context(instance, storage))
        (request,) = result.run_requests
        assert request.job_name == "prediction_job"
        assert "f__view__w1" in request.tags[REASON_TAG] and "PSI" in request.tags[REASON_TAG]
        assert not drift(sensor_context(instance, storage, result.cursor)).run_requests  # once per hour

        # The retrain failed or was not promoted: the same model and matrix ask again only once a new whole-cohort
        # matrix exists, not at every new hour.
        later = NEWEST + 2 * HOUR
        write_events(storage, events_table([{"user_id": "u1", "event_type": "view", "event_time": later}]))
        assert not drift(sensor_context(instance, storage, result.cursor)).run_requests
        write_matrix(later, "infer", shifted, "cohort")
        again = drift(sensor_context(instance, storage, result.cursor))
        assert [r.partition_key for r in again.run_requests] == [prediction_hour_key("buy_7d", later)]

        # A model trained at the hour of the daily cohort run (the default cadence's 23:00) is compared with that
        # run's matrix; no retrain while it is the newest hour (nothing newer to learn from), one once events follow.
        fake_model(storage, "buy_7d", later)
        write_matrix(later, "train", stacked, None)
        at_model_hour = drift(sensor_context(instance, storage, again.cursor))
        assert not at_model_hour.run_requests and "inference matrix of 2026-03-02-06:00" in at_model_hour.skip_reason.skip_message
        write_events(storage, events_table([{"user_id": "u1", "event_type": "view", "event_time": later + HOUR}]))
        assert drift(sensor_context(instance, storage, again.cursor)).run_requests
