"""The `automl` command as a user runs it."""

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from automl_assets.cli import main
from automl_assets.core import layout
from automl_assets.core.event_store import write_events
from automl_assets.core.timewin import HOUR, hours_between
from resources.storage import LocalStorage
from tests.conftest import events_table, fake_model, utc

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "predictions" / "purchase_7d.yaml"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AUTOML_STORAGE_ROOT", str(tmp_path / "store"))
    (tmp_path / "home").mkdir()
    # The instance settings the project ships (run queue limits), which in-process runs must work under too.
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "home")
    return LocalStorage(root=str(tmp_path / "store"))


def test_register_adds_the_partition_and_stores_the_spec(env, capsys):
    assert main(["register", str(SAMPLE)]) == 0
    assert "registered prediction 'purchase_7d'" in capsys.readouterr().out
    assert env.exists(*layout.spec_file("purchase_7d"))
    with dg.DagsterInstance.get() as instance:
        assert instance.has_dynamic_partition("prediction", "purchase_7d")
    assert main(["register", str(SAMPLE)]) == 0
    assert "updated prediction 'purchase_7d'" in capsys.readouterr().out


def test_register_warns_when_the_outcome_event_is_not_in_the_store(env, tmp_path, capsys):
    """A misspelt outcome event would otherwise show only as a training run with no positives."""
    start = utc(2026, 3, 1, 5)
    write_events(env, events_table([{"user_id": "u1", "event_type": name, "event_time": start} for name in ("view", "purchse")]))
    assert main(["register", str(SAMPLE)]) == 0  # outcome: purchase
    assert "warning: no 'purchase' event in the 4 weeks before 2026-03-01T06:00:00+00:00 (most frequent: purchse, view)" in capsys.readouterr().err
    write_events(env, events_table([{"user_id": "u1", "event_type": "purchase", "event_time": start}]))
    assert main(["register", str(SAMPLE)]) == 0
    assert capsys.readouterr().err == ""


def test_register_rejects_a_bad_spec_with_its_reasons(env, tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\noutcome: {event: buy}\nhorizon: 7 days\n")
    assert main(["register", str(bad)]) == 2
    assert "horizon: '7 days' is not a duration" in capsys.readouterr().err
    # Valid, but no run could train it: refused rather than failing every hour.
    revenue = tmp_path / "revenue_7d.yaml"
    revenue.write_text("name: revenue_7d\noutcome: {sum: revenue}\nhorizon: 7d\n")
    assert main(["register", str(revenue)]) == 2
    assert "revenue_7d: outcome.sum (a regression target) is not supported yet, so it is not registered" in capsys.readouterr().err
    with dg.DagsterInstance.get() as instance:
        assert not instance.has_dynamic_partition("prediction", "revenue_7d")
    assert not env.exists(*layout.spec_file("revenue_7d"))


def test_scores_prints_a_users_latest_scores(env, capsys):
    table = pa.table(
        {
            "user_id": ["u1", "u2"],
            "prediction": ["buy_7d"] * 2,
            "score": [0.3, 0.1],
            "percentile": [90.0, 40.0],
            "model_version": ["buy_7d@2026-03-01T23"] * 2,
            "scored_at": pa.array([utc(2026, 3, 2)] * 2, pa.timestamp("us", tz="UTC")),
        }
    )
    env.write_table(table, *layout.latest_scores("buy_7d"))
    assert main(["scores", "u1"]) == 0
    out = capsys.readouterr().out
    assert "u1" in out and "0.3" in out and "u2" not in out
    assert main(["scores", "nobody"]) == 1


def test_project_env_is_read_from_the_working_directory_first(tmp_path, monkeypatch):
    from automl_assets.runs import load_project_env

    (tmp_path / ".env").write_text("AUTOML_TEST_FROM_ENV_FILE=cwd\nDAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=false\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOML_TEST_FROM_ENV_FILE", raising=False)
    monkeypatch.setenv("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")  # already set: kept
    load_project_env()
    assert os.environ["AUTOML_TEST_FROM_ENV_FILE"] == "cwd"
    assert os.environ["DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"] == "true"
    monkeypatch.delenv("AUTOML_TEST_FROM_ENV_FILE")


def test_backfill_with_dagsters_default_planned_events(env, monkeypatch):
    """Without the project's .env setting (an install that has no .env) a range run plans every hour, and works."""
    monkeypatch.setenv("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "false")
    start = utc(2026, 3, 1, 5)
    write_events(env, events_table([{"user_id": "u1", "event_type": "view", "event_time": start.replace(minute=n)} for n in range(3)]))
    assert main(["backfill", "2026-03-01-05:00", "2026-03-01-07:00"]) == 0
    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_run_records(dg.RunsFilter(job_name="event_store_job"))
        planned = instance.all_logs(run.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
        assert len(planned) == 2 * 3  # per asset and hour
        assert len(instance.get_materialized_partitions(dg.AssetKey("hourly_rollups"))) == 3


def test_backfill_is_one_event_store_run_and_idempotent(env):
    start = utc(2026, 3, 1, 5)
    rows = [
        {"user_id": f"u{i}", "event_type": "view", "event_time": start.replace(hour=5 + i % 3, minute=i), "event_properties": {"page": "home"}, "user_properties": {"plan": "free"}}
        for i in range(30)
    ]
    write_events(env, events_table(rows))
    hours = hours_between(start, utc(2026, 3, 1, 8))

    def snapshot():
        return {
            str(path.relative_to(env.base)): pa.parquet.read_table(path)
            for path in sorted(env.base.glob("rollups/*/hour=*/*.parquet")) + sorted(env.base.glob("events/hour=*/*.parquet"))
        }

    assert main(["backfill", "2026-03-01-05:00", "2026-03-01-07:00"]) == 0
    first = snapshot()
    assert len(first) == 4 * len(hours)  # events + three rollup kinds per hour
    assert main(["backfill", "2026-03-01-05:00", "2026-03-01-07:00"]) == 0
    second = snapshot()
    assert first.keys() == second.keys() and all(first[k].equals(second[k]) for k in first)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_run_records(dg.RunsFilter(job_name="event_store_job"))
        assert len(runs) == 2  # one run per backfill, whatever the number of hours
        planned = instance.all_logs(runs[0].dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
        assert len(planned) == 2  # one per asset for the whole range (.env), not one per hour
        assert len(instance.get_materialized_partitions(dg.AssetKey("hourly_rollups"))) == len(hours)


def test_ingest_materialises_the_hours_that_are_partitions_and_over(env, tmp_path, capsys):
    """Events before the first partition, or in the hour under way, are staged but left out of the run (one of them
    used to fail it); the raw file is kept under landing/ for a rebuild."""
    now = datetime.now(timezone.utc)
    lines = [
        {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01T05:06:07Z", "insert_id": "a"},
        {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01T07:00:00Z", "insert_id": "b"},
        {"user_id": "u1", "event_type": "view", "event_time": "2024-06-01T00:00:00Z", "insert_id": "before"},
        {"user_id": "u1", "event_type": "view", "event_time": now.isoformat(), "insert_id": "under_way"},
    ]
    source = tmp_path / "export.json"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["ingest", str(source)]) == 0
    out = capsys.readouterr().out
    assert "2 hours are staged but not materialised" in out
    assert "for the 3 hours from 2026-03-01-05:00 to 2026-03-01-07:00" in out
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_materialized_partitions(dg.AssetKey("events"))) == ["2026-03-01-05:00", "2026-03-01-06:00", "2026-03-01-07:00"]
    assert [path.name for path in env.base.glob("landing/*/*")] == ["export.json"]
    # The same bytes again, with a mapping: not parsed again, and said so; the kept folder is unchanged.
    assert main(["ingest", str(source), "--mapping", '{"user_id": "uid"}']) == 0
    assert "staged before (same bytes), so it is not parsed again" in capsys.readouterr().out
    assert [path.name for path in env.base.glob("landing/*/*")] == ["export.json"]


def test_materialize_trains_only_when_due_or_asked(env, monkeypatch, capsys):
    """`automl materialize` scores with the model in force, as the hourly automation would; it trains first when no
    model is in force (or the cadence is due), or with --train."""
    import automl_assets.runs

    launched = []
    monkeypatch.setattr(
        automl_assets.runs, "run_prediction", lambda instance, name, hour, scope, train: launched.append(train) or SimpleNamespace(run_id="r")
    )
    assert main(["register", str(SAMPLE)]) == 0
    hour = utc(2026, 3, 2, 4)
    assert main(["materialize", "purchase_7d", "2026-03-02-04:00"]) == 0  # no model yet
    fake_model(env, "purchase_7d", hour - 3 * HOUR)
    assert main(["materialize", "purchase_7d", "2026-03-02-04:00"]) == 0
    assert main(["materialize", "purchase_7d", "2026-03-02-04:00", "--train"]) == 0
    assert launched == [True, False, True]
    assert "scored with the model in force" in capsys.readouterr().out


def test_mistakes_get_an_error_that_says_what_to_do_before_any_run(env, tmp_path, monkeypatch, capsys):
    assert main(["materialize", "nope", "2026-03-01-23:00"]) == 2
    assert "no registered prediction named nope (registered: none); register its spec first" in capsys.readouterr().err
    assert main(["backfill", "2026-03-01-05:00", "2026-03-01-06:00", "--prediction", "typo"]) == 2
    assert "no registered prediction named typo" in capsys.readouterr().err
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_records() == []  # the event store did not run first
    assert main(["ingest", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "missing.csv"), "--mapping", '{"user_id": uid}']) == 2
    assert "--mapping is not valid JSON" in capsys.readouterr().err

    # Hours: a partition key or ISO, on the hour, in order, and over (the hour under way is the schedule's).
    assert main(["register", str(SAMPLE)]) == 0
    assert main(["scores", "u1", "--prediction", "typo"]) == 2
    assert "no registered prediction named typo" in capsys.readouterr().err
    under_way = datetime.now(timezone.utc).strftime("%Y-%m-%d-%H:00")
    for argv, says in [
        (["materialize", "purchase_7d", "2026-03-01-23:30"], "'2026-03-01-23:30' is not an hour: give its partition key"),
        (["materialize", "purchase_7d", "yesterday"], "'yesterday' is not an hour"),
        (["materialize", "purchase_7d", under_way], f"hour {under_way} is not over yet (UTC): the newest hour that can run is"),
        (["materialize", "purchase_7d", "2024-12-31T23:00"], "hour 2024-12-31-23:00 is before the first partition"),
        (["backfill", "2026-03-01-06:00", "2026-03-01-05:00"], "the last hour 2026-03-01-05:00 is before the first 2026-03-01-06:00"),
        (["backfill", "2026-03-01-05:00", under_way], "is not over yet"),
    ]:
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_records() == []  # no hour checked above started a run

    # Endpoints are stopped by prediction or endpoint name; an unknown name is an error, not "was not running".
    monkeypatch.setenv("AUTOML_SAGEMAKER_ROOT", str(tmp_path / "sagemaker"))
    assert main(["endpoints", "--stop", "purchase_7d"]) == 2
    assert "no endpoint for purchase_7d; deployed: none" in capsys.readouterr().err
    state = tmp_path / "sagemaker" / "endpoints" / "automl-purchase-7d.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")  # deployed once, its process long gone
    assert main(["endpoints", "--stop", "purchase_7d"]) == 0
    assert capsys.readouterr().out == "automl-purchase-7d: was not running\n" and not state.exists()


def test_the_demo_keeps_one_history_per_store(tmp_path):
    """A re-run on a later day repeats the stored history instead of adding the same users' other days to it;
    other settings are refused with what to do."""
    from automl_assets.demo import DEMO_FILE, demo_history

    landing = tmp_path / "landing" / "demo-seed7"
    first = demo_history(landing, users=3000, weeks=10, seed=7, end=None)
    assert first.hour == 0 and first <= datetime.now(timezone.utc)
    record = json.loads((landing / DEMO_FILE).read_text())
    record["end"] = "2026-03-02T00:00:00+00:00"  # as if generated on an earlier day
    (landing / DEMO_FILE).write_text(json.dumps(record))
    assert demo_history(landing, users=3000, weeks=10, seed=7, end=None) == utc(2026, 3, 2)
    for other in ({"users": 500}, {"end": utc(2026, 3, 9)}):
        with pytest.raises(ValueError, match="would mix two histories of the same users"):
            demo_history(landing, **({"users": 3000, "weeks": 10, "seed": 7, "end": None} | other))


def test_a_failed_run_says_why_in_the_terminal(env, capsys):
    """The reason a run failed (a step's dg.Failure, a blocking check's description) ends the error line, not
    Dagster's 'Execution of step ... failed'."""
    start = utc(2026, 3, 1, 5)
    write_events(env, events_table([{"user_id": "u1", "event_type": "view", "event_time": start}]))
    assert main(["register", str(SAMPLE)]) == 0
    assert main(["materialize", "purchase_7d", "2026-03-01-05:00"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: prediction_job run for purchase_7d at 2026-03-01-05:00 failed: step ")
    assert "step cohort: the training cohort of purchase_7d as of 2026-02-22T06:00:00+00:00 is empty" in error
    assert "Execution of step" not in error
