"""P1: cold feature build. The project's feature matrix (8 rolling weeks x the top 50 events, as of one hour) on ~20M
synthetic events, against a hand-written DuckDB query computing the same matrix from the same raw event parquet.

    .venv/bin/python benchmarks/p1_feature_build.py            # ~20M events (1M users, 10 weeks)
    .venv/bin/python benchmarks/p1_feature_build.py --small    # ~1M events
    .venv/bin/python benchmarks/p1_feature_build.py --small --keep   # keep the store for p2_hourly_refresh.py --store

What is timed, for each of the project's engines (--engines; default every engine, DuckDB embedded being the default):
  generate          synthetic events (not part of any ratio)
  ingest            event_store.write_events into the hour-partitioned store: ingestion, reported, NOT in the ratios
  <engine>_start    the engine as the project's resource builds it (resources.environments.engine_resource)
  <engine>_cold     feature_sql.feature_query (top 50 events by volume, weeks=8, no properties, as of END) on the
                    store as ingested, without rollups: engine.register_rollups makes the rollup views compute the
                    hours not rolled up from their events (the same rollup definitions), written by engine.write
  <engine>_rollups  engine.build_rollups over every hour of the history (one query per rollup kind and week): the
                    backfill the hourly refresh (P2) reads; reported, not in the cold ratio
  <engine>_features the same query over the stored rollups (the warm feature step)
  duckdb_hand       the hand-written DuckDB query over the store's events parquet files of the 8 weeks (one file per
                    hour, the files the project reads), written to parquet
"project cold" = <engine>_cold (the engine's start is reported and given as a second ratio).

Every matrix is compared with the hand-written one after sorting by user_id: same users, same columns, equal values;
any difference fails the script. Ratios are the last lines printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

LOOKBACK_WEEKS = 8
TOP_EVENTS = 50


def duckdb_feature_sql(events: tuple[str, ...], files: list[str], as_of_hour: int, out: str, active_only: bool = False) -> str:
    """The matrix by hand, straight from raw events: weeks [T-7d*k, T-7d*(k-1)) of the integer hour axis, hours since
    the last event = T_hour - max(hour), never = 8*168 + 1. `active_only`: only users with an event in the hour
    before T (P2's refresh).

    The fastest of the formulations tried on this machine at 20M events (see benchmarks/README.md): one wide
    aggregate with 172 FILTER clauses took 48 s, SUM(CASE ...) 26 s, this one (per-hour counts, per-week counts, then
    DuckDB's PIVOT for the 144 week columns and the 18 recency columns) 14 s."""
    from automl_assets.core.feature_sql import HOURS_PER_WEEK, _Names, sql_literal

    if any('"' in event for event in events):
        raise SystemExit("an event name holds a double quote: the PIVOT column references below would need escaping")
    names = _Names()  # the project's column naming, so the columns can be compared by name
    weeks, never = LOOKBACK_WEEKS, LOOKBACK_WEEKS * HOURS_PER_WEEK + 1
    start = as_of_hour - weeks * HOURS_PER_WEEK
    keys = ", ".join(sql_literal(f"{e}__w{w + 1}") for e in events for w in range(weeks))
    recency_keys = ", ".join(sql_literal(e) for e in events)
    totals = ", ".join(f"SUM(n) FILTER (WHERE wk = {w}) AS w{w + 1}" for w in range(weeks))
    cols = [f"CAST(COALESCE(t.w{w + 1}, 0) AS DOUBLE) AS {names('all', f'w{w + 1}')}" for w in range(weeks)]
    cols.append(f"CAST(a.active_hours AS DOUBLE) AS {names('all', 'active_hours')}")
    cols.append(f"CAST({as_of_hour} - t.last_hour AS DOUBLE) AS {names('all', 'hours_since')}")
    for event in events:
        cols += [f'CAST(COALESCE(c."{event}__w{w + 1}", 0) AS DOUBLE) AS {names(event, f"w{w + 1}")}' for w in range(weeks)]
        cols.append(f'CAST(COALESCE({as_of_hour} - r."{event}", {never}) AS DOUBLE) AS {names(event, "hours_since")}')
    file_list = ", ".join(f"'{f}'" for f in files)
    only = f"WHERE user_id IN (SELECT user_id FROM per_hour WHERE hour_idx = {as_of_hour - 1})" if active_only else ""
    return f"""
COPY (
  WITH per_hour AS MATERIALIZED (
    SELECT user_id, event_type, epoch_us(event_time) // 3600000000 AS hour_idx, COUNT(*) AS n
    FROM read_parquet([{file_list}])
    WHERE epoch_us(event_time) // 3600000000 >= {start} AND epoch_us(event_time) // 3600000000 < {as_of_hour}
    GROUP BY ALL
  ),
  per_week AS MATERIALIZED (
    SELECT user_id, event_type, ({as_of_hour} - 1 - hour_idx) // {HOURS_PER_WEEK} AS wk, SUM(n) AS n,
           MAX(hour_idx) AS last_hour
    FROM per_hour {only} GROUP BY ALL
  ),
  t AS (SELECT user_id, {totals}, MAX(last_hour) AS last_hour FROM per_week GROUP BY user_id),
  a AS (SELECT user_id, COUNT(DISTINCT hour_idx) AS active_hours FROM per_hour {only} GROUP BY user_id),
  c AS (PIVOT (SELECT user_id, event_type || '__w' || (wk + 1) AS k, n FROM per_week)
        ON k IN ({keys}) USING SUM(n) GROUP BY user_id),
  r AS (PIVOT (SELECT user_id, event_type, last_hour FROM per_week)
        ON event_type IN ({recency_keys}) USING MAX(last_hour) GROUP BY user_id)
  SELECT t.user_id, {', '.join(cols)}
  FROM t JOIN a USING (user_id) LEFT JOIN c USING (user_id) LEFT JOIN r USING (user_id)
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""


def load_sorted(path: str):
    import pyarrow.dataset as ds

    frame = ds.dataset(path, format="parquet").to_table().to_pandas()
    return frame.sort_values("user_id", kind="stable").reset_index(drop=True)


def compare(reference_name: str, reference, other_name: str, other, columns) -> None:
    """Fail loudly unless both matrices have the same users, the same columns and equal values."""
    import numpy as np

    expected = {"user_id", *columns}
    for name, frame in ((reference_name, reference), (other_name, other)):
        if set(frame.columns) != expected:
            raise SystemExit(
                f"MISMATCH: {name} columns differ from the feature query's: missing "
                f"{sorted(expected - set(frame.columns))[:10]}, extra {sorted(set(frame.columns) - expected)[:10]}"
            )
    if len(reference) != len(other) or not (reference["user_id"].to_numpy() == other["user_id"].to_numpy()).all():
        only_ref = set(reference["user_id"]) - set(other["user_id"])
        only_other = set(other["user_id"]) - set(reference["user_id"])
        raise SystemExit(
            f"MISMATCH: users differ: {len(reference)} in {reference_name}, {len(other)} in {other_name}; "
            f"only in {reference_name}: {sorted(only_ref)[:5]}, only in {other_name}: {sorted(only_other)[:5]}"
        )
    bad = []
    for column in columns:
        a, b = reference[column].to_numpy(np.float64), other[column].to_numpy(np.float64)
        if not np.array_equal(a, b):
            row = int(np.flatnonzero(a != b)[0])
            bad.append(f"{column} (user {reference['user_id'][row]}: {a[row]} vs {b[row]})")
    if bad:
        raise SystemExit(f"MISMATCH: {len(bad)} columns differ between {reference_name} and {other_name}: {bad[:5]}")
    c.log(f"{reference_name} == {other_name}: {len(reference):,} users x {len(columns)} feature columns, all values equal")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_size_options(parser)
    parser.add_argument("--engines", default=",".join(c.engine_names()),
                        help="the project's engines to time, in order (default: every engine)")
    args = parser.parse_args(argv)
    users = c.users_for(args)
    engines = [e for e in args.engines.split(",") if e]
    what_if_conf = c.apply_spark_conf(args.spark_conf)
    c.describe_machine()

    with c.workdir(args, "bench-p1-") as work:
        c.embedded_spark_only(work)
        import duckdb
        import pyarrow.parquet as pq

        from automl_assets.core import event_store, layout
        from automl_assets.core.feature_sql import Taxonomy, feature_query
        from automl_assets.core.spark_jobs import existing_hour_paths
        from automl_assets.core.timewin import epoch_hour, hours_between
        from resources.storage import LocalStorage

        t = c.Timings()
        store = work / "store"
        storage = LocalStorage(root=str(store))
        as_of, as_of_hour = c.END, epoch_hour(c.END)

        with t.step("generate", f"{users:,} users, {c.WEEKS} weeks (+1 held-out hour) of synthetic events"):
            history, new_hour = c.generate(users)
            pq.write_table(new_hour, work / "new_hour.parquet")
        n_events = history.num_rows
        n_users = len(history["user_id"].unique()) if n_events else 0
        events = c.top_events(history, as_of, LOOKBACK_WEEKS, TOP_EVENTS)
        c.log(f"{n_events:,} events of {n_users:,} users before {as_of.isoformat()}; held out {new_hour.num_rows:,} "
              f"events of the next hour; {len(events)} event types (all of them are in the top {TOP_EVENTS})")
        first_hour = c.config_for(users).start
        del new_hour

        with t.step("ingest", "event_store.write_events into the hour-partitioned store (excluded from the ratios)"):
            hours_written = event_store.write_events(storage, history)
        del history
        gc.collect()
        c.log(f"{len(hours_written)} hour files written")

        all_hours = hours_between(first_hour, as_of)
        taxonomy = Taxonomy(events=events, weeks=LOOKBACK_WEEKS)
        query = feature_query(taxonomy, as_of_hour)
        lookback = hours_between(as_of - timedelta(weeks=LOOKBACK_WEEKS), as_of)
        rows, failed = {}, {}
        for name in engines:
            # Each engine starts cold (no rollups in the store) and then builds every rollup itself.
            engine = None
            try:
                storage.remove(*layout.hourly_rollups_root())
                storage.remove(*layout.daily_rollups_root())
                with t.step(f"{name}_start", f"the project's {name} engine (embedded, default settings)"):
                    engine = c.make_engine(name)
                with t.step(f"{name}_cold", f"{name}: feature_query ({len(query.columns)} columns) on a store without rollups: the rollup views compute them from the events, to parquet"):
                    engine.register_rollups(storage, lookback)
                    rows[name] = engine.write(query.sql, storage, ("bench", f"features_cold_{name}"))
                c.log(f"{name} matrix: {rows[name]:,} users x {len(query.columns)} features")
                with t.step(f"{name}_rollups", f"{name}: build_rollups over {len(all_hours)} hours (one query per kind and week), for the hourly refresh"):
                    rollup_rows = engine.build_rollups(storage, all_hours)
                c.log(f"rollup rows: {rollup_rows}")
                with t.step(f"{name}_features", f"{name}: the same feature_query over the stored rollups, to parquet"):
                    engine.register_rollups(storage, lookback)
                    engine.write(query.sql, storage, ("bench", f"features_{name}"))
            except Exception as error:  # noqa: BLE001 - a failing engine is a result, reported at the end
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                reason = next((line for key in ("Job aborted", "Caused by", "Exception", "Error") for line in lines if key in line),
                              lines[0] if lines else type(error).__name__)
                failed[name] = f"{type(error).__name__}: {reason.strip()[:400]}"
                c.log(f"{name} FAILED: {failed[name]}")
            finally:
                if engine is not None:
                    with t.step(f"{name}_stop"):
                        c.stop_engine(engine)
                del engine
                gc.collect()
        engines = [name for name in engines if name not in failed]

        # DuckDB reads the same raw events: the store's events parquet files of the 8-week window (one per hour).
        files = existing_hour_paths(storage, layout.events_root(), lookback, ("events.parquet",))
        duck_out = str(work / "features_duckdb_hand.parquet")
        with t.step("duckdb_hand", f"hand-written DuckDB query over {len(files)} event files of the store, to parquet"):
            con = duckdb.connect()
            con.execute(duckdb_feature_sql(events, files, as_of_hour, duck_out))
            con.close()

        with t.step("compare", "sorting the matrices by user_id and comparing every value"):
            hand = load_sorted(duck_out)
            for name in engines:
                for kind in ("cold", "rollups"):
                    path = storage.path("bench", f"features_{name}" if kind == "rollups" else f"features_cold_{name}")
                    compare("duckdb(hand-written)", hand, f"project({name}, {kind})", load_sorted(path), query.columns)

        del hand
        default = c.default_engine()
        project_seconds = {name: t[f"{name}_cold"] for name in engines}
        # What P2 needs to refresh this store: the taxonomy's events and this run's numbers.
        (work / "p1_result.json").write_text(json.dumps({
            "events": list(events), "as_of": as_of.isoformat(), "n_events": n_events, "n_users": n_users,
            "matrix_rows": rows, "timings": dict(t), "project_cold_seconds": project_seconds, "default_engine": default,
            "failed": failed, "spark_conf": args.spark_conf,
        }, indent=2))

    matrix_rows = next(iter(rows.values()), 0)
    print()
    print(f"P1 results ({n_events:,} events, {n_users:,} users, matrix {matrix_rows:,} x {len(query.columns)}; "
          f"machine load average at the end {c.machine().load}; {c.code_state()})")
    if what_if_conf:
        print(f"  {what_if_conf}")
    for name, reason in failed.items():
        print(f"  {name} FAILED: {reason}")
    for name, seconds in t.items():
        print(f"  {name:<20} {seconds:8.1f} s")
    print("  ingestion (write_events) is reported above and excluded from every ratio")
    goal = lambda r: "goal <= 1.0x MET" if r <= 1.0 else "goal <= 1.0x NOT MET"  # noqa: E731
    base = t["duckdb_hand"]
    for name in engines:
        print(f"  project cold on {name}{' (the default engine)' if name == default else ''} = features from the events = "
              f"{project_seconds[name]:.1f} s (+ engine start {t[f'{name}_start']:.1f} s); hand-written DuckDB {base:.1f} s; "
              f"then the rollup backfill the hourly refresh reads {t[f'{name}_rollups']:.1f} s (not in the ratios)")
    for name, reason in failed.items():
        print(f"P1 ratio [{name}{', default engine' if name == default else ''}] cold project/DuckDB: FAILED "
              f"({reason[:160]})  goal <= 1.0x NOT MET")
    for name in engines:
        tag = f"{name}{', default engine' if name == default else ''}{', WHAT-IF settings' if what_if_conf and name == 'spark' else ''}"
        r_cold = project_seconds[name] / base
        r_start = (project_seconds[name] + t[f"{name}_start"]) / base
        r_feat = t[f"{name}_features"] / base
        print(f"P1 ratio [{tag}] cold project/DuckDB (features from the events, excl. ingestion and engine start): {r_cold:.2f}x  {goal(r_cold)}")
        print(f"P1 ratio [{tag}] cold project/DuckDB incl. engine start: {r_start:.2f}x  {goal(r_start)}")
        print(f"P1 ratio [{tag}] feature step over built rollups project/DuckDB: {r_feat:.2f}x  {goal(r_feat)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
