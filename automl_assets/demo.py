"""The demo: synthetic events -> Amplitude export files -> event store -> a registered prediction -> calibrated
scores, every step a Dagster run recorded in the instance the UI shows."""

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from automl_assets.cli import _instance, _storage
from automl_assets.core import layout
from automl_assets.core.spec import load_spec
from automl_assets.core.synthetic import SyntheticConfig, generate_events, write_amplitude_export
from automl_assets.core.timewin import HOUR, WEEK, hour_key
from automl_assets.predictions import calibrator_parts, register_prediction
from automl_assets.runs import run_event_store, run_prediction

SAMPLE_SPEC = Path(__file__).resolve().parent.parent / "predictions" / "purchase_7d.yaml"


DEMO_FILE = "_demo.json"  # the history in a demo's landing folder (a name the landing sensor skips)


def last_midnight() -> datetime:
    return datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def demo_history(landing: Path, users: int, weeks: int, seed: int, end: datetime | None) -> datetime:
    """The end of the demo history to generate into `landing`. A store keeps one: another one's files (the same
    synthetic users on other days) would be merged with it into one mixed history. So a re-run without --end
    repeats the stored one, which changes nothing, and other settings are refused."""
    record = landing / DEMO_FILE
    stored = json.loads(record.read_text()) if record.exists() else None
    if end is None and stored is not None:
        end = datetime.fromisoformat(stored["end"])
    wanted = {"users": users, "weeks": weeks, "seed": seed, "end": (end or last_midnight()).isoformat()}
    if stored is not None and stored != wanted:
        raise ValueError(
            f"{landing} holds the demo history {stored}; {wanted} beside it would mix two histories of the same "
            "users. Re-run with the stored settings, or start over in another store: delete the store folder "
            "(AUTOML_STORAGE_ROOT, default .automl_store) or point AUTOML_STORAGE_ROOT elsewhere."
        )
    landing.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted))
    return datetime.fromisoformat(wanted["end"])


def run_demo(users: int, weeks: int, seed: int, end: datetime | None = None) -> int:
    storage, instance = _storage(), _instance()
    landing = Path(storage.path(*layout.landing(), f"demo-seed{seed}"))
    end = demo_history(landing, users, weeks, seed, end)
    print(f"1/4 generating {users:,} synthetic users over {weeks} weeks ending {end.isoformat()} (seed {seed})")
    events = 0
    for chunk in generate_events(SyntheticConfig(n_users=users, end=end, weeks=weeks, seed=seed)):
        write_amplitude_export(chunk, landing)
        events += chunk.num_rows
    print(f"    {events:,} events written to {landing} as Amplitude export files")

    print("2/4 ingesting into the hour-partitioned event store and building hourly rollups (one Dagster run)")
    run_event_store(instance, end - weeks * WEEK, end)

    spec = load_spec(SAMPLE_SPEC)
    register_prediction(instance, storage, spec)
    hour = end - HOUR
    print(f"3/4 registered '{spec.name}'; materialising taxonomy -> scores for partition {hour_key(hour)}|{spec.name}")
    result = run_prediction(instance, spec.name, hour, scope="cohort")

    print("4/4 results")
    metrics = storage.read_json(*layout.prediction_asset(spec.name, "model", hour, "output", "metrics.json"))
    calibration = storage.read_json(*calibrator_parts(spec.name, hour))
    chosen = metrics["chosen"]
    print(f"    candidates (validation: {metrics['n_validation']:,} rows, every weekly snapshot of 20% of users held out):")
    width = max(map(len, metrics["metrics"]))
    for name, m in sorted(metrics["metrics"].items(), key=lambda item: item[1]["log_loss"]):
        print(f"      {name:<{width}} AUC {m['auc']:.3f}  log-loss {m['log_loss']:.4f}{'   <- chosen' if name == chosen else ''}")
    before, after = calibration["before"], calibration["after"]
    print(
        f"    on their newest snapshot ({metrics['n_calibration']:,} users): AUC {after['auc']:.3f}; expected calibration "
        f"error {before['ece']:.4f} -> {after['ece']:.4f} after calibration"
    )
    scores = storage.read_table(*layout.prediction_asset(spec.name, "scores", hour, "scores.parquet")).to_pandas()
    print(f"    scored {len(scores):,} users (run {result.run_id}); top 10:")
    with pd.option_context("display.width", 120):
        print(scores.nlargest(10, "score").to_string(index=False))
    print(
        "\nSee the same graph, runs and metadata in the Dagster UI:\n"
        f"    DAGSTER_HOME={Path(instance.root_directory).resolve()} .venv/bin/dg dev\n"
        "then open http://127.0.0.1:3000 (Assets -> scores)."
    )
    return 0
