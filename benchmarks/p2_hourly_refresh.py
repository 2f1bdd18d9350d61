"""P2: hourly refresh. After P1's state, one new hour of events arrives: ingest it, roll it up, compute the features of
the users active in it, and score them. Goal: <= 0.1x of P1's project time (the cold feature build).

    .venv/bin/python benchmarks/p1_feature_build.py --workdir /tmp/bench/p1     # leaves store/, new_hour.parquet, p1_result.json
    .venv/bin/python benchmarks/p2_hourly_refresh.py --store /tmp/bench/p1      # refresh that store (~20M events)
    .venv/bin/python benchmarks/p2_hourly_refresh.py --small                     # no store given: runs P1 --small first

The new hour is the hour [END, END + 1h) that P1 generated and held out (new_hour.parquet). Timed steps, for each
engine P1 timed (the new hour is removed from the store before each engine's refresh, so each starts from P1's state):
  <engine>_start     the engine as the project builds it (Spark starts once per Dagster run, so an hourly run pays it)
  <engine>_ingest    event_store.write_events of the new hour
  <engine>_rollups   build_rollups for that one hour
  <engine>_features  the hourly cohort (feature_sql.cohort_query(..., only_active_last_hour=True), written to parquet as
                     the cohort asset of an hourly run writes it: active within 28 days and in the hour)
                     and feature_query(..., users=<that cohort>) as of END + 1h over 8 weeks of rollup views, to parquet
  <engine>_scoring   the project's hourly scoring path for those users (model.raw_scores) as the default configuration
                     runs the hourly runs the sensors launch: the features sent to the prediction's warm endpoint (the
                     entry script's `serve` mode, deployed before the clock starts, as the first hourly run after a
                     retrain does once), then the calibrator, percentiles, the scores file and scores.merge_latest into
                     the latest-score table
  <engine>_scoring_batch  the same through a batch transform of the entry script, as hourly runs started by hand or
                     AUTOML_HOURLY_ENDPOINT=never score (resources.sagemaker.LocalSageMaker.transform, a subprocess
                     that loads the model every hour)
The model and calibrator are trained beforehand (not timed) on a sample of P1's matrix with a stand-in label
(purchased in the last week): only their cost of scoring matters here. The scoring job's cohort and matrix-join steps
and Dagster's own overhead are not in this measure (P3 runs the graph through Dagster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

LOOKBACK_WEEKS = 8
ENDPOINT = "automl-bench-p2"
TRAIN_SAMPLE_USERS = 50_000


def prepare_model(storage, work: Path, columns: list[str], engine: str) -> tuple[Path, object, list[float]]:
    """A model (core.training) and calibrator (core.calibration) fitted on a sample of P1's matrix, and a latest-score
    table holding every user of it, as the daily run would have left it. Not timed."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    from automl_assets.core import layout
    from automl_assets.core.calibration import fit_calibrator
    from automl_assets.core.training import save_model, train_candidates
    from automl_assets.scores import SCORE_SCHEMA

    matrix = ds.dataset(storage.path("bench", f"features_{engine}"), format="parquet").to_table().to_pandas()
    latest = pd.DataFrame({
        "user_id": matrix["user_id"], "prediction": "bench", "score": 0.01, "percentile": 50.0,
        "model_version": "bench@daily", "scored_at": pd.Timestamp(c.END - timedelta(hours=1)),
    })
    storage.write_table(pa.Table.from_pandas(latest, schema=SCORE_SCHEMA, preserve_index=False), *layout.latest_scores("bench"))
    sample = matrix.sample(n=min(TRAIN_SAMPLE_USERS, len(matrix)), random_state=0).reset_index(drop=True)
    sample["label"] = (sample["f__purchase__w1"] > 0).astype(int)
    outcome = train_candidates(sample, columns, models=("logistic_regression", "hist_gradient_boosting"))
    model_dir = work / "model"
    save_model(outcome, model_dir)
    held_out = outcome.validation_predictions
    calibrator = fit_calibrator(held_out["raw_score"].to_numpy(float), held_out["label"].to_numpy(int))
    reference = np.quantile(calibrator.predict(held_out["raw_score"].to_numpy(float)), np.linspace(0, 1, 1001)).tolist()
    c.log(f"stand-in model: {outcome.chosen} on {outcome.n_train:,} users (AUC {outcome.metrics[outcome.chosen]['auc']:.3f}); "
          f"latest-score table seeded with {len(latest):,} users")
    return model_dir, calibrator, reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a P1 work folder (store/, new_hour.parquet, p1_result.json); refreshed in place")
    parser.add_argument("--engines", help="engines to time (default: those P1 timed)")
    c.add_size_options(parser)
    args = parser.parse_args(argv)
    what_if_conf = c.apply_spark_conf(args.spark_conf)
    c.describe_machine()

    with c.workdir(args, "bench-p2-") as scratch:
        if args.store:
            work = Path(args.store)
        else:
            work = scratch / "p1"
            size = ["--users", str(args.users)] if args.users else ["--" + (args.size or "small")]
            c.log(f"no --store given: building one with P1 ({' '.join(size)}) in {work}, in a child process")
            # A child process, so that this process starts Spark cold, as an hourly Dagster run would.
            p1 = Path(__file__).resolve().parent / "p1_feature_build.py"
            subprocess.run([sys.executable, str(p1), *size, "--workdir", str(work)], check=True)
        c.embedded_spark_only(scratch)
        p1 = json.loads((work / "p1_result.json").read_text())
        p1_project = p1["project_cold_seconds"]
        engines = [e for e in (args.engines or ",".join(p1_project)).split(",") if e]
        missing = [e for e in engines if e not in p1_project]
        if missing:
            raise SystemExit(f"P1 in {work} did not time the engines {missing}: no P1 time to compare with")

        import duckdb
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        from automl_assets.core import event_store, layout
        from automl_assets.core.engines import remove_rollups
        from automl_assets.core.feature_sql import Taxonomy, cohort_query, feature_query
        from automl_assets.core.spark_jobs import existing_hour_paths
        from automl_assets.core.timewin import epoch_hour, hours_between
        from automl_assets.model import raw_scores
        from automl_assets.scores import SCORE_SCHEMA, merge_latest, percentiles
        from p1_feature_build import compare, duckdb_feature_sql, load_sorted
        from resources.sagemaker import LocalSageMaker
        from resources.storage import LocalStorage

        storage = LocalStorage(root=str(work / "store"))
        new_hour = pq.read_table(work / "new_hour.parquet")
        hour, as_of = c.END, c.END + c.HOUR
        taxonomy = Taxonomy(events=tuple(p1["events"]), weeks=LOOKBACK_WEEKS)
        query = feature_query(taxonomy, epoch_hour(as_of), users="hourly_cohort")
        hourly_cohort = f"SELECT user_id FROM ({cohort_query(epoch_hour(as_of), 28 * 24, LOOKBACK_WEEKS, {}, only_active_last_hour=True)}) c"
        with c.Timings().step("setup", "training the stand-in model and calibrator (not timed)"):
            model_dir, calibrator, reference = prepare_model(storage, scratch, list(query.columns), next(iter(p1_project)))
        sagemaker = LocalSageMaker(work_root=str(scratch / "sagemaker"))
        with c.Timings().step("endpoint_deploy", f"the stand-in model's endpoint {ENDPOINT} (not timed: once per model)"):
            sagemaker.deploy(ENDPOINT, model_dir, c.log)
        lookback = hours_between(as_of - timedelta(weeks=LOOKBACK_WEEKS), as_of)
        new_users = len(new_hour["user_id"].unique())

        t = c.Timings()
        active_users = {}
        for name in engines:
            # Every engine refreshes the same state: the new hour is not in the store yet.
            storage.remove(*layout.events_hour(hour)[:-1])
            remove_rollups(storage, [hour])
            c.log(f"[{name}] refreshing hour {hour.isoformat()}: {new_hour.num_rows:,} new events of {new_users:,} users")
            with t.step(f"{name}_start", f"the project's {name} engine (a fresh process would pay this every hour)"):
                engine = c.make_engine(name)
            with t.step(f"{name}_ingest", "event_store.write_events of the new hour"):
                event_store.write_events(storage, new_hour)
            with t.step(f"{name}_rollups", "build_rollups of the new hour"):
                rows = engine.build_rollups(storage, [hour])
            c.log(f"rollup rows of the hour: {rows}")
            out = ("bench", f"features_active_{name}")
            with t.step(f"{name}_features", f"hourly cohort and its feature query ({len(query.columns)} columns) over 8 weeks of rollups, to parquet"):
                engine.register_rollups(storage, lookback)
                # As the cohort asset writes it and the feature step reads it back.
                engine.write(hourly_cohort, storage, ("bench", f"cohort_active_{name}"))
                engine.register_parquet("hourly_cohort", storage.path("bench", f"cohort_active_{name}"))
                active_users[name] = engine.write(query.sql, storage, out)
            c.log(f"features of {active_users[name]:,} active users")
            matrix_dir = storage.path(*out)
            for step, endpoint in ((f"{name}_scoring", ENDPOINT), (f"{name}_scoring_batch", None)):
                how = f"warm endpoint {endpoint}" if endpoint else "SageMaker-style batch transform (subprocess)"
                with t.step(step, f"{how}, calibration, scores, merge_latest"):
                    matrix = pd.read_parquet(matrix_dir)
                    raw = raw_scores(sagemaker, str(model_dir), matrix_dir, matrix, endpoint, "transform-bench", lambda line: None)
                    score = calibrator.predict(raw)
                    result = pd.DataFrame({
                        "user_id": matrix["user_id"].to_numpy(), "prediction": "bench", "score": score,
                        "percentile": percentiles(score, reference), "model_version": "bench@stand-in",
                        "scored_at": pd.Timestamp(as_of),
                    })
                    storage.write_table(pa.Table.from_pandas(result, schema=SCORE_SCHEMA, preserve_index=False),
                                        "bench", f"scores_{name}", "scores.parquet")
                    latest_rows = merge_latest(storage, "bench", result)
            c.log(f"scored {len(result):,} users; latest-score table {latest_rows:,} users")
            if not np.isfinite(result["score"]).all():
                raise SystemExit("scores are not all finite")
            c.stop_engine(engine)
            del engine

        sagemaker.delete_endpoint(ENDPOINT)

        # The active users' features must equal the hand-written DuckDB query's over the raw events (new hour included).
        check_out = str(scratch / "features_active_hand.parquet")
        files = existing_hour_paths(storage, layout.events_root(), lookback, ("events.parquet",))
        with t.step("duckdb_hand", f"hand-written DuckDB query for the active users over {len(files)} event files (reference)"):
            con = duckdb.connect()
            con.execute(duckdb_feature_sql(taxonomy.events, files, epoch_hour(as_of), check_out, active_only=True))
            con.close()
        reference_matrix = load_sorted(check_out)
        for name in engines:
            compare("duckdb(hand-written)", reference_matrix, f"project({name})",
                    load_sorted(storage.path("bench", f"features_active_{name}")), query.columns)

    default = p1["default_engine"]
    print()
    print(f"P2 results (store of {p1['n_events']:,} events; new hour {new_hour.num_rows:,} events of {new_users:,} users; "
          f"machine load average at the end {c.machine().load}; {c.code_state()})")
    if what_if_conf:
        print(f"  {what_if_conf}")
    if p1["spark_conf"]:
        print(f"  the P1 times compared with were measured with WHAT-IF Spark settings: {', '.join(p1['spark_conf'])}")
    for name, seconds in t.items():
        print(f"  {name:<26} {seconds:8.1f} s")
    goal = lambda r: "goal <= 0.1x MET" if r <= 0.1 else "goal <= 0.1x NOT MET"  # noqa: E731
    lines = []
    for name in engines:
        refresh = sum(t[f"{name}_{step}"] for step in ("ingest", "rollups", "features", "scoring"))
        base = p1_project[name]
        print(f"  [{name}] refresh = ingest + rollups + features + scoring (endpoint) = {refresh:.1f} s (+ engine start "
              f"{t[f'{name}_start']:.1f} s); P1 project time on {name} (cold feature build) {base:.1f} s; "
              f"{active_users[name]:,} users scored")
        tag = f"{name}{', default engine' if name == default else ''}"
        r, r_start = refresh / base, (refresh + t[f"{name}_start"]) / base
        r_feat = (refresh - t[f"{name}_scoring"]) / base
        r_batch = r_feat + t[f"{name}_scoring_batch"] / base
        lines += [
            f"P2 ratio [{tag}] without scoring (ingest + rollups + features)/P1 project: {r_feat:.3f}x  {goal(r_feat)}",
            f"P2 ratio [{tag}] refresh scored by a batch transform (runs by hand, AUTOML_HOURLY_ENDPOINT=never)/P1 "
            f"project: {r_batch:.3f}x  {goal(r_batch)}",
            f"P2 ratio [{tag}] refresh incl. engine start (a fresh run), endpoint: {r_start:.3f}x  {goal(r_start)}",
            f"P2 ratio [{tag}] refresh/P1 project (ingest + rollups + features + scoring by the warm endpoint, as "
            f"the default configuration scores the hourly runs the sensors launch; engine up): {r:.3f}x  {goal(r)}",
        ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
