"""Read event exports (Amplitude, Segment, CSV, parquet) into the canonical event table.

Every record of a readable file ends up either as one canonical event or as one quarantine row that says why, so no
valid event is lost to a bad neighbour. Only a file that cannot be read at all raises ``IngestError``.

Choices the design notes leave open, fixed here:
- ``record_number`` is the 1-based position of the record in the file: non-blank JSON lines (each element of a JSON
  array or Segment batch counts as one record), CSV data rows after the header, parquet rows.
- Property maps are never null: a source without properties gives an empty map.
- Segment ``anonymousId`` is a device-level id, so it becomes ``device:<anonymousId>`` like Amplitude's ``device_id``;
  ``screen`` calls are read like ``page`` calls (event type ``$screen``); other message types are quarantined.
- Epoch numbers (JSON numbers, digit-only strings, integer parquet columns) are milliseconds, as in Amplitude.
- ``events`` keeps the file's order; ``dedupe_events`` sorts.
"""

from __future__ import annotations

import csv
import gc
import gzip
import hashlib
import io
import itertools
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from automl_assets.core.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA

FORMATS = ("amplitude", "segment", "csv", "parquet")

MISSING_USER_ID = "missing_user_id"
MISSING_EVENT_TYPE = "missing_event_type"
BAD_EVENT_TIME = "bad_event_time"
INVALID_JSON = "invalid_json"
BAD_PROPERTIES = "bad_properties"
BAD_REVENUE = "bad_revenue"
MALFORMED_ROW = "malformed_row"  # a CSV row whose field count differs from the header's
UNSUPPORTED_TYPE = "unsupported_type"  # a Segment message that is not track/identify/page/screen
REASONS = (
    MISSING_USER_ID,
    MISSING_EVENT_TYPE,
    BAD_EVENT_TIME,
    INVALID_JSON,
    BAD_PROPERTIES,
    BAD_REVENUE,
    MALFORMED_ROW,
    UNSUPPORTED_TYPE,
)

RAW_LIMIT = 2000

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
_CSV_SUFFIXES = (".csv", ".csv.gz")
_SEGMENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
_REQUIRED_FIELDS = ("event_type", "event_time")  # every other ColumnMapping field may be None
# The order in which every reader hands a record's source values to _canonical.
_FIELD_ORDER = (
    "user_id",
    "device_id",
    "event_type",
    "event_time",
    "insert_id",
    "event_properties",
    "user_properties",
    "revenue",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_US = timedelta(microseconds=1)
# Bounds that keep every accepted time convertible back to a datetime (needed for the derived insert_id).
_MIN_US = (datetime.min.replace(tzinfo=timezone.utc) - _EPOCH) // _ONE_US
_MAX_US = (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH) // _ONE_US
_EPOCH_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?").fullmatch


class IngestError(Exception):
    """A file that cannot be read at all; the message names the file, the problem and what to do."""


@dataclass(frozen=True)
class ColumnMapping:
    """Where each canonical field lives in a CSV or parquet source (canonical field -> source column).

    ``event_properties`` / ``user_properties`` columns hold JSON object text, or structs/maps in parquet.
    ``user_id`` may be None when ``device_id`` is set, for sources that only know devices.
    """

    user_id: str | None = "user_id"
    event_type: str = "event_type"
    event_time: str = "event_time"
    insert_id: str | None = None
    device_id: str | None = None
    event_properties: str | None = None
    user_properties: str | None = None
    revenue: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            column = getattr(self, f.name)
            if column is None and f.name not in _REQUIRED_FIELDS:
                continue
            if not isinstance(column, str) or not column:
                raise ValueError(f"ColumnMapping.{f.name} must be a non-empty column name, got {column!r}")
        if self.user_id is None and self.device_id is None:
            raise ValueError("ColumnMapping needs a user_id or a device_id column")

    @classmethod
    def from_dict(cls, d: dict) -> ColumnMapping:
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise ValueError(f"unknown ColumnMapping keys: {', '.join(unknown)} (known: {', '.join(known)})")
        return cls(**d)

    def columns(self) -> dict[str, str]:
        """Canonical field -> source column, for the fields that are mapped."""
        return {name: getattr(self, name) for name in _FIELD_ORDER if getattr(self, name) is not None}


@dataclass
class IngestResult:
    events: pa.Table
    quarantine: pa.Table
    duplicates: int

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.quarantine.column("reason").to_pylist()).items()))


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------------
# Value normalisation shared by every format


def _text(value: Any) -> str | None:
    """An id-like value as stripped text; None when missing, empty or not a scalar."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        # Integer ids often arrive as floats (pandas NaN-able columns); "42.0" would not match "42" elsewhere.
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _first(d: dict, *keys: str) -> Any:
    """The first of ``keys`` whose value is present and not blank."""
    for key in keys:
        value = d.get(key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def _micros_in_range(us: int) -> int | None:
    return us if _MIN_US <= us <= _MAX_US else None


def _datetime_micros(dt: datetime) -> int | None:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # naive times are UTC by the design's convention
    return _micros_in_range((dt - _EPOCH) // _ONE_US)


def _epoch_ms_micros(ms: int | float) -> int | None:
    if isinstance(ms, float):
        if not math.isfinite(ms):
            return None
        return _micros_in_range(round(ms * 1000))
    return _micros_in_range(ms * 1000)


def _micros(value: Any) -> int | None:
    """Microseconds since the epoch (UTC) for any accepted time representation, else None."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if _EPOCH_NUMBER(text):
            return _epoch_ms_micros(float(text) if "." in text else int(text))
        try:
            return _datetime_micros(datetime.fromisoformat(text))
        except ValueError:
            return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _epoch_ms_micros(value)
    if isinstance(value, datetime):
        return _datetime_micros(value)
    if isinstance(value, date):
        return _datetime_micros(datetime(value.year, value.month, value.day))
    return None


def _property_text(value: Any) -> str:
    """A non-string property value as its JSON text (true, 3, 2.5), so it round-trips; str/repr match json.dumps
    for bools, ints and finite floats and are much faster."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, (dict, list, tuple, float)):  # nested values, and NaN/Infinity in their JSON spelling
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def _property_items(value: Any) -> list[tuple[str, str]]:
    """A property object as sorted (key, text) pairs without null values; anything but an object is rejected."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _Rejected(BAD_PROPERTIES)
    items = [
        (k if isinstance(k, str) else str(k), v if isinstance(v, str) else _property_text(v))
        for k, v in value.items()
        if v is not None
    ]
    items.sort()
    return items


def _revenue(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        if not value.strip():
            return None
        try:
            number = float(value)
        except ValueError:
            raise _Rejected(BAD_REVENUE) from None
    else:
        raise _Rejected(BAD_REVENUE)
    if math.isnan(number):
        return None  # pandas' spelling of a missing number
    if math.isinf(number):
        raise _Rejected(BAD_REVENUE)
    return number


def _derived_insert_id(user_id: str, event_type: str, event_time_us: int, event_properties: list) -> str:
    """A stable id for sources without one, so re-ingesting the same event deduplicates against itself."""
    iso = (_EPOCH + timedelta(microseconds=event_time_us)).isoformat(timespec="microseconds")
    payload = json.dumps([user_id, event_type, iso, event_properties])
    return "h:" + hashlib.sha1(payload.encode("utf-8")).hexdigest()


def _canonical(
    user_id: Any,
    device_id: Any,
    event_type: Any,
    event_time: Any,
    insert_id: Any,
    event_properties: Any,
    user_properties: Any,
    revenue: Any,
) -> tuple:
    """One record's source values as a canonical row; raises _Rejected with the first problem found."""
    uid = _text(user_id)
    if uid is None:
        device = _text(device_id)
        if device is None:
            raise _Rejected(MISSING_USER_ID)
        uid = "device:" + device
    etype = _text(event_type)
    if etype is None:
        raise _Rejected(MISSING_EVENT_TYPE)
    us = _micros(event_time)
    if us is None:
        raise _Rejected(BAD_EVENT_TIME)
    eprops = _property_items(event_properties)
    uprops = _property_items(user_properties)
    amount = _revenue(revenue)
    iid = _text(insert_id) or _derived_insert_id(uid, etype, us, eprops)
    return uid, etype, us, iid, eprops, uprops, amount


class _Collector:
    """Accumulates canonical rows and quarantine rows for one file, deduplicating on insert_id as it goes."""

    def __init__(self, source: Path, raw_text: Callable[[Any], str]) -> None:
        self.source = str(source)
        self.raw_text = raw_text  # called only for rejected records, so the raw text costs nothing for good ones
        self.rows: list[tuple] = []
        self.seen: set[str] = set()
        self.duplicates = 0
        self.rejected: list[tuple[int, str, str]] = []

    def add(self, number: int, raw: Any, extract: Callable[[Any], tuple], record: Any) -> None:
        try:
            row = _canonical(*extract(record))
        except _Rejected as rejection:
            self.reject(number, rejection.reason, raw)
            return
        if row[3] in self.seen:
            self.duplicates += 1
            return
        self.seen.add(row[3])
        self.rows.append(row)

    def reject(self, number: int, reason: str, raw: Any) -> None:
        self.rejected.append((number, reason, self.raw_text(raw)[:RAW_LIMIT]))

    def result(self) -> IngestResult:
        columns = list(zip(*self.rows)) or [()] * len(EVENT_SCHEMA)
        events = pa.Table.from_arrays(
            [pa.array(column, type=field.type) for column, field in zip(columns, EVENT_SCHEMA)], schema=EVENT_SCHEMA
        )
        numbers, reasons, raws = zip(*self.rejected) if self.rejected else ((), (), ())
        quarantine = pa.Table.from_arrays(
            [
                pa.array([self.source] * len(numbers), pa.string()),
                pa.array(numbers, pa.int64()),
                pa.array(reasons, pa.string()),
                pa.array(raws, pa.string()),
            ],
            schema=QUARANTINE_SCHEMA,
        )
        return IngestResult(events=events, quarantine=quarantine, duplicates=self.duplicates)


# ---------------------------------------------------------------------------------------------------------------------
# JSON sources (Amplitude export, Segment messages)


def _amplitude_fields(record: dict) -> tuple:
    properties = record.get("event_properties")
    revenue = record.get("revenue")
    if revenue is None and isinstance(properties, dict):
        revenue = _first(properties, "$revenue", "revenue")
    return (
        record.get("user_id"),
        record.get("device_id"),
        record.get("event_type"),
        record.get("event_time"),
        _first(record, "insert_id", "$insert_id", "uuid"),
        properties,
        record.get("user_properties"),
        revenue,
    )


def _segment_fields(message: dict) -> tuple:
    kind = message.get("type")
    context = message.get("context")
    context_traits = context.get("traits") if isinstance(context, dict) else None
    if kind == "identify":
        event_type, properties, traits = "$identify", None, message.get("traits")
    elif kind == "track":
        event_type, properties, traits = message.get("event"), message.get("properties"), context_traits
    elif kind in ("page", "screen"):
        event_type, properties, traits = "$" + kind, message.get("properties"), context_traits
        name = message.get("name")
        if name is not None:
            if properties is None:
                properties = {}
            if isinstance(properties, dict):
                properties = {**properties, "name": name}
    else:
        raise _Rejected(UNSUPPORTED_TYPE)
    revenue = properties.get("revenue") if isinstance(properties, dict) else None
    return (
        message.get("userId"),
        message.get("anonymousId"),
        event_type,
        _first(message, "timestamp", "originalTimestamp", "sentAt"),
        message.get("messageId"),
        properties,
        traits,
        revenue,
    )


def _is_batch(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("batch"), list)


def _elements(value: Any, raw: Any) -> Iterator[tuple[Any, Any]]:
    """A JSON array or Segment batch as its records; any other value is one record."""
    if isinstance(value, list):
        items = value
    elif _is_batch(value):
        items = value["batch"]
    else:
        yield raw, value
        return
    for item in items:
        yield item, item


def _line_records(lines: Iterable[bytes]) -> Iterator[tuple[Any, Any]]:
    for line in lines:
        if not line or line.isspace():
            continue
        try:
            value = json.loads(line)
        except ValueError:  # also covers bytes that are not UTF-8
            yield line, None
            continue
        if isinstance(value, dict) and not _is_batch(value):
            yield line, value
        else:
            yield from _elements(value, line)


def _json_records(f: io.BufferedIOBase) -> Iterator[tuple[Any, Any]]:
    """(raw, value) per record of JSON lines, a JSON array, or a single (batch) object, streaming JSON lines."""
    lines = iter(f)
    for first in lines:
        if not first.isspace():
            break
    else:
        return
    try:
        json.loads(first)
    except ValueError:
        # The first line alone is not JSON: either a pretty-printed document or a JSON-lines file with a broken first
        # line. Only the former parses as a whole.
        data = first + f.read()
        try:
            document = json.loads(data)
        except ValueError:
            yield from _line_records(data.splitlines())
            return
        yield from _elements(document, document)
        return
    yield from _line_records(itertools.chain([first], lines))


def _sniff(records: Iterator[tuple[Any, Any]]) -> tuple[str, Iterator[tuple[Any, Any]]]:
    """The JSON format from the first object record, and the records with that prefix put back."""
    head = []
    fmt = "amplitude"
    for raw, value in records:
        head.append((raw, value))
        if isinstance(value, dict):
            if "messageId" in value or value.get("type") in _SEGMENT_TYPES:
                fmt = "segment"
            break
    return fmt, itertools.chain(head, records)


def _json_raw(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace").rstrip("\r\n")
    return json.dumps(raw, ensure_ascii=False, default=str)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns low-level read failures into IngestErrors that say what to do."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IngestError(
            f"{path}: not a readable gzip file ({e}). "
            "Re-download or re-export it; a .gz file must hold complete gzip data."
        ) from e
    except OSError as e:
        raise IngestError(f"{path}: cannot be read ({e}). Check the file's permissions and that it is complete.") from e


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_json(path: Path, fmt: str | None) -> IngestResult:
    collector = _Collector(path, _json_raw)
    with _reading(path), _open_binary(path) as f:
        records = _json_records(f)
        if fmt is None:
            fmt, records = _sniff(records)
        extract = _amplitude_fields if fmt == "amplitude" else _segment_fields
        for number, (raw, value) in enumerate(records, 1):
            if isinstance(value, dict):
                collector.add(number, raw, extract, value)
            else:
                collector.reject(number, INVALID_JSON, raw)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------------
# Tabular sources (CSV, parquet) with a ColumnMapping


def _json_cell(value: Any) -> Any:
    """A property cell: JSON object text is decoded; structs and maps (parquet) are already dicts."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text  # not JSON: _property_items rejects it as bad_properties
    return value


def _tabular_fields(values: list) -> tuple:
    user_id, device_id, event_type, event_time, insert_id, event_properties, user_properties, revenue = values
    return (
        user_id,
        device_id,
        event_type,
        event_time,
        insert_id,
        _json_cell(event_properties),
        _json_cell(user_properties),
        revenue,
    )


def _check_columns(path: Path, available: list[str], mapping: ColumnMapping) -> None:
    missing = {field: column for field, column in mapping.columns().items() if column not in available}
    if not missing:
        return
    absent = list(dict.fromkeys(missing.values()))
    quoted = ", ".join(f"'{column}'" for column in absent)
    what = f"column {quoted} from the mapping is" if len(absent) == 1 else f"columns {quoted} from the mapping are"
    raise IngestError(
        f"{path}: {what} not in the file (columns: {', '.join(available)}). Fix the mapping's {', '.join(missing)}."
    )


def _csv_line(row: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row)
    return out.getvalue()


def _read_csv(path: Path, mapping: ColumnMapping) -> IngestResult:
    collector = _Collector(path, _csv_line)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with _reading(path), opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise IngestError(f"{path}: the file is empty. Export the events as CSV with a header row.")
            _check_columns(path, header, mapping)
            columns = mapping.columns()
            positions = [header.index(columns[name]) if name in columns else None for name in _FIELD_ORDER]
            width = len(header)
            for number, row in enumerate(filter(None, reader), 1):  # blank lines are not records
                if len(row) != width:
                    collector.reject(number, MALFORMED_ROW, row)
                    continue
                collector.add(number, row, _tabular_fields, [None if i is None else row[i] for i in positions])
        except UnicodeDecodeError as e:
            raise IngestError(f"{path}: not UTF-8 text ({e}). Re-export it as UTF-8 CSV.") from e
        except csv.Error as e:
            raise IngestError(
                f"{path}: not valid CSV at line {reader.line_num} ({e}). Fix or re-export the file."
            ) from e
    return collector.result()


def _time_values(column: pa.ChunkedArray) -> list:
    if pa.types.is_timestamp(column.type):
        # Nanosecond timestamps would come back as pandas objects; microseconds is the canonical precision anyway.
        column = column.cast(pa.timestamp("us", tz=column.type.tz), safe=False)
    return column.to_pylist()


def _read_parquet(path: Path, mapping: ColumnMapping) -> IngestResult:
    try:
        parquet = pq.ParquetFile(path)
        _check_columns(path, parquet.schema_arrow.names, mapping)
        columns = mapping.columns()
        table = parquet.read(columns=list(dict.fromkeys(columns.values())))
    except (pa.ArrowException, OSError) as e:
        raise IngestError(
            f"{path}: not a readable parquet file ({e}). Re-export it, or check it was completely written."
        ) from e

    def raw_row(number: int) -> str:
        return json.dumps(table.slice(number - 1, 1).to_pylist()[0], ensure_ascii=False, default=str)

    values = []
    for name in _FIELD_ORDER:
        if name not in columns:
            values.append(itertools.repeat(None))
        elif name == "event_time":
            values.append(_time_values(table.column(columns[name])))
        else:
            values.append(table.column(columns[name]).to_pylist(maps_as_pydicts="lossy"))
    collector = _Collector(path, raw_row)
    for number, row in enumerate(zip(*values), 1):
        collector.add(number, number, _tabular_fields, row)
    return collector.result()


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def _family(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    raise IngestError(
        f"{path}: unknown file type. Name it .json, .jsonl or .json.gz (Amplitude or Segment), .csv or .parquet, "
        f"or pass fmt= one of {', '.join(FORMATS)}."
    )


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise IngestError(f"{path}: file not found. Check the path, and that the export has finished writing it.")


def detect_format(path: str | Path) -> str:
    """One of FORMATS, from the extension; JSON files are told apart by their first object record."""
    path = Path(path)
    family = _family(path)
    if family != "json":
        return family
    _require_file(path)
    with _reading(path), _open_binary(path) as f:
        fmt, _ = _sniff(_json_records(f))
    return fmt


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Reading creates millions of small dicts, lists and tuples, which trigger repeated collections that about double
    the parse time; none of them form cycles, so collection can wait until the file is read."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_events(path: str | Path, fmt: str | None = None, mapping: ColumnMapping | None = None) -> IngestResult:
    """Canonical events of one file, deduplicated on insert_id (first occurrence wins), plus its quarantined records."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise IngestError(f"{path}: unknown format {fmt!r}. Use one of {', '.join(FORMATS)}.")
    family = _family(path) if fmt is None else ("json" if fmt in ("amplitude", "segment") else fmt)
    if mapping is not None and family == "json":
        raise ValueError("a ColumnMapping applies to csv and parquet sources only")
    _require_file(path)
    with _gc_paused():
        if family == "json":
            return _read_json(path, fmt)
        if family == "csv":
            return _read_csv(path, mapping or ColumnMapping())
        return _read_parquet(path, mapping or ColumnMapping())


def dedupe_events(*tables: pa.Table) -> pa.Table:
    """Union of EVENT_SCHEMA tables keeping the first row per insert_id (earlier arguments win), sorted by
    (event_time, insert_id) so the same input always gives the same output."""
    if not tables:
        return EVENT_SCHEMA.empty_table()
    combined = pa.concat_tables([table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA) for table in tables])
    positions = combined.select(["insert_id"]).append_column("row", pa.array(np.arange(combined.num_rows)))
    first = positions.group_by("insert_id", use_threads=False).aggregate([("row", "min")]).column("row_min")
    return combined.take(first).sort_by([("event_time", "ascending"), ("insert_id", "ascending")])
