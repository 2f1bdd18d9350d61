"""P3: end to end through Dagster. ~20M synthetic events -> calibrated scores for everyone in the cohort: the
event-store assets materialised over the whole hour range in one run (as a single-run backfill does), then every
prediction asset for one partition with the run tag automl/scope=cohort, as tests/test_graph.py does it (with the
project's QUIET run config: console logs at WARNING, as its CLI launches runs). Goal: < 3 minutes and < 8 GB peak memory of the whole process tree.

    .venv/bin/python benchmarks/p3_end_to_end.py                      # ~20M events, Amplitude export files in landing/
    .venv/bin/python benchmarks/p3_end_to_end.py --small              # ~1M events
    .venv/bin/python benchmarks/p3_end_to_end.py --landing store      # events pre-written into the store instead
    .venv/bin/python benchmarks/p3_end_to_end.py --engine spark       # AUTOML_ENGINE=spark (default: the project's)

Where the events start (--landing):
  amplitude (default)  gzipped Amplitude export files (one per hour, core.synthetic.write_amplitude_export) under
                       landing/: the `events` asset parses and stages them, then merges them into hour files. This is
                       the project's ingestion path (the demo's and the test's), so "events -> scores" includes it.
  store                events written straight into the hour files with event_store.write_events before the clock
                       starts (reported separately); the `events` asset then finds nothing new to stage and only
                       re-reads and deduplicates each hour, and `hourly_rollups` does the rest.
Data generation and the export run in a child process before the clock starts (not timed, and the child has exited
before the measured steps begin). Peak memory is the summed RSS (/proc) of this process and all its descendants
(the Spark JVM, the SageMaker-style training and transform subprocesses), sampled every 0.25 s.

The prediction is the project's sample spec predictions/purchase_7d.yaml (7-day purchase, cohort active within 28
days, 8 weeks of features, top 50 events, the default candidate models), for the hour ending at END (midnight UTC).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

GOAL_SECONDS = 180
GOAL_BYTES = 8 * 10**9
SPEC_FILE = c.ROOT / "predictions" / "purchase_7d.yaml"


def generate_child(users: int, landing: str, store: str, out: str) -> None:
    """Runs in a child process: generate the events and put them where --landing says."""
    from automl_assets.core.synthetic import generate_table, write_amplitude_export

    table = generate_table(c.config_for(users, c.END))
    result = {"events": table.num_rows, "users": len(table["user_id"].unique())}
    if landing == "amplitude":
        from automl_assets.core import layout

        start = time.perf_counter()
        paths = write_amplitude_export(table, Path(store, *layout.landing(), "synthetic"))
        result.update(files=len(paths), export_seconds=time.perf_counter() - start)
    else:
        from automl_assets.core import event_store
        from resources.storage import LocalStorage

        start = time.perf_counter()
        hours = event_store.write_events(LocalStorage(root=store), table)
        result.update(files=len(hours), write_events_seconds=time.perf_counter() - start)
    Path(out).write_text(json.dumps(result))


def failure_text(event) -> str:
    """The step and the telling line of its error (e.g. Spark's 'Job aborted ...'), for a failed run's report."""
    error = event.step_failure_data.error if event.step_failure_data else None
    lines = []
    while error is not None:
        lines += [line.strip() for line in error.message.splitlines() if line.strip() and not line.strip().startswith("at ")]
        error = error.cause
    key_line = next((line for key in ("Job aborted", "Caused by") for line in lines if key in line), None)
    return f"step {event.step_key}: " + (key_line or " ".join(lines[:2]) or (event.message or ""))


def step_windows(instance, run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) epoch seconds of each step, from the run's event log."""
    starts, windows = {}, {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = record.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and event.step_key in starts:
            windows[event.step_key] = (starts[event.step_key], record.timestamp)
    return windows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_size_options(parser)
    parser.add_argument("--landing", choices=("amplitude", "store"), default="amplitude")
    parser.add_argument("--engine", choices=("duckdb", "spark"),
                        help="the project's SQL engine (AUTOML_ENGINE); default: whatever the project defaults to")
    parser.add_argument("--generate-child", nargs=3, metavar=("LANDING", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    users = c.users_for(args)
    if args.generate_child:
        generate_child(users, *args.generate_child)
        return 0
    what_if_conf = c.apply_spark_conf(args.spark_conf)
    c.describe_machine()

    with c.workdir(args, "bench-p3-") as work, c.TreeMemory() as memory:
        c.embedded_spark_only(work)
        if args.engine:
            os.environ["AUTOML_ENGINE"] = args.engine
        engine = c.default_engine()
        c.log(f"engine: {engine}")
        t = c.Timings()
        t.memory = memory
        store = work / "store"
        info_file = work / "generated.json"
        what = "Amplitude export files in landing/" if args.landing == "amplitude" else "event_store.write_events into the store"
        with t.step("generate", f"{users:,} users, {c.WEEKS} weeks, then {what} (child process, not timed, not in the peak)"):
            size = ["--users", str(users)]
            subprocess.run([sys.executable, __file__, *size, "--generate-child", args.landing, str(store), str(info_file)], check=True)
        generated = json.loads(info_file.read_text())
        c.log(f"{generated['events']:,} events of {generated['users']:,} users in {generated['files']} files")

        import dagster as dg

        from automl_assets.core.spec import load_spec
        from automl_assets.core.timewin import HOUR, hour_key
        from automl_assets.definitions import ASSET_MODULES
        from automl_assets.partitions import prediction_hour_key
        from automl_assets.predictions import SCOPE_TAG, register_prediction
        from automl_assets.runs import QUIET, RANGE_END_TAG, RANGE_START_TAG, load_project_env
        from resources.environments import resources_for_env
        from resources.sagemaker import LocalSageMaker
        from resources.storage import LocalStorage

        load_project_env()  # the project's Dagster settings (.env), as `automl backfill` and `dg dev` run with them
        assets = dg.load_assets_from_modules(ASSET_MODULES)
        event_store_assets = [a for a in assets if a.key.path[0] in ("events", "hourly_rollups")]
        prediction_assets = [a for a in assets if a not in event_store_assets]
        resources = {
            **resources_for_env("local"),
            "storage": LocalStorage(root=str(store)),
            "sagemaker": LocalSageMaker(work_root=str(work / "sagemaker")),
        }
        spec = load_spec(SPEC_FILE)
        config = c.config_for(users, c.END)
        hour = c.END - HOUR

        (work / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(work / "dagster")) as instance:

            def run(name: str, what: str, selection, **options):
                """One timed dg.materialize; a failed run stops the benchmark with the failing step's message."""
                with t.step(name, what):
                    result = dg.materialize(
                        selection, instance=instance, resources=resources, run_config=QUIET, raise_on_error=False, **options
                    )
                if not result.success:
                    failures = [failure_text(e) for e in result.all_events if e.is_step_failure]
                    raise SystemExit(f"P3 [{engine}] {name} FAILED after {t[name]:.1f} s: {' / '.join(failures)[:1500]}")
                return result

            pipeline_start = time.perf_counter()
            event_run = run(
                "event_store_run", "dg.materialize(events, hourly_rollups) over every hour, one run", event_store_assets,
                tags={RANGE_START_TAG: hour_key(config.start), RANGE_END_TAG: hour_key(c.END - HOUR)},
            )
            register_prediction(instance, resources["storage"], spec)
            prediction = run(
                "prediction_run", f"dg.materialize(taxonomy ... scores) for {hour_key(hour)}|{spec.name}, scope cohort",
                prediction_assets, partition_key=prediction_hour_key(spec.name, hour), tags={SCOPE_TAG: "cohort"},
            )
            total = time.perf_counter() - pipeline_start
            event_steps = step_windows(instance, event_run.run_id)
            prediction_steps = step_windows(instance, prediction.run_id)
            scores = prediction.asset_materializations_for_node("scores")[0].metadata
            model_meta = prediction.asset_materializations_for_node("model")[0].metadata
            users_scored = scores["users_scored"].value
            chosen = model_meta["chosen_model"].value
            auc = model_meta["auc"].value
            n_train = model_meta["n_train"].value
            calib = prediction.asset_materializations_for_node("calibrator")[0].metadata
            ece = (calib["ece_before"].value, calib["ece_after"].value)
        memory.current_step = "done"

    pipeline_peak = max(v for k, v in memory.peak_by_step.items() if k in ("event_store_run", "prediction_run"))
    print()
    print(f"P3 results ({generated['events']:,} events of {generated['users']:,} users, landing={args.landing}, "
          f"engine={engine}; machine load average at the end {c.machine().load}; {c.code_state()})")
    if what_if_conf:
        print(f"  {what_if_conf}")
    if "export_seconds" in generated:
        print(f"  (not timed) Amplitude export written in {generated['export_seconds']:.1f} s")
    if "write_events_seconds" in generated:
        print(f"  (not timed) event_store.write_events ingestion {generated['write_events_seconds']:.1f} s")
    for name, seconds in t.items():
        print(f"  {name:<26} {seconds:8.1f} s   peak RSS of the tree {c.gib(memory.peak_by_step.get(name, 0))}")
    for run_name, run_steps in (("event_store_run", event_steps), ("prediction_run", prediction_steps)):
        for name, (start, end) in run_steps.items():
            print(f"    step {name:<22} {end - start:8.1f} s   peak RSS of the tree {c.gib(memory.peak_between(start, end))}")
        inside = sum(end - start for start, end in run_steps.values())
        print(f"    {run_name}: Dagster outside the steps (planning, events, {len(run_steps)} steps) {t[run_name] - inside:8.1f} s")
    print(f"  model: {chosen}, AUC {auc:.3f} (validation), trained on {n_train:,} users; ECE {ece[0]:.4f} -> {ece[1]:.4f}")
    print(f"  users scored (whole cohort): {users_scored:,}")
    peak_step = max(("event_store_run", "prediction_run"), key=lambda k: memory.peak_by_step.get(k, 0))
    detail = memory.peak_detail_by_step.get(peak_step, {})
    print(f"  at the pipeline's peak ({peak_step}): "
          + ", ".join(f"{k} {c.gib(v)}" for k, v in sorted(detail.items(), key=lambda kv: -kv[1])))
    time_ok = "MET" if total < GOAL_SECONDS else "NOT MET"
    mem_ok = "MET" if pipeline_peak < GOAL_BYTES else "NOT MET"
    print(f"P3 [{engine}, landing={args.landing}] time events->scores: {total:.1f} s = {total / GOAL_SECONDS:.2f}x of the 180 s goal  goal < 3 min {time_ok}")
    print(f"P3 [{engine}, landing={args.landing}] peak memory of the process tree: {pipeline_peak / 1e9:.2f} GB = {pipeline_peak / GOAL_BYTES:.2f}x of the "
          f"8 GB goal  goal < 8 GB {mem_ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
