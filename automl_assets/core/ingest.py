"""Read event exports (Amplitude, Segment, CSV, parquet) into the canonical event table.

Every record of a readable file ends up either as one canonical event or as one quarantine row that says why, so no
valid event is lost to a bad neighbour. Only a file that cannot be read at all raises ``IngestError``.

Choices the design notes leave open, fixed here:
- ``record_number`` is the 1-based position of the record in the file: non-blank JSON lines (each element of a JSON
  array or Segment batch counts as one record), CSV data rows after the header, parquet rows.
- Property maps are never null: a source without properties gives an empty map.
- Segment ``anonymousId`` is a device-level id, so it becomes ``device:<anonymousId>`` like Amplitude's ``device_id``;
  ``screen`` calls are read like ``page`` calls (event type ``$screen``); other message types are quarantined.
- Epoch numbers (JSON numbers, digit-only strings, integer parquet columns) are milliseconds, as in Amplitude, and
  seconds below 10^11 (as milliseconds that is before March 1973; Mixpanel's import, too, takes either unit):
  exports from warehouses and logs often count seconds, which as milliseconds would all land in January 1970.
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
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from automl_assets.core.schema import EVENT_SCHEMA, PROPERTY_MAP, QUARANTINE_SCHEMA

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
# Accepted event times: from the Unix epoch to the end of 2099. Anything else is a placeholder ("0001-01-01") or a
# unit mistake (a 14-digit epoch); a year before 1000 would not even name an hour folder the store can read back.
_MIN_US = 0
_MAX_US = (datetime(2100, 1, 1, tzinfo=timezone.utc) - _EPOCH) // _ONE_US - 1
_EPOCH_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?").fullmatch
# Epoch numbers below this are seconds, the others milliseconds (see the module's docstring).
_EPOCH_SECONDS_BELOW = 10**11


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


def _unicode(text: str) -> str:
    """`text`, if it is Unicode text: JSON's escapes can spell a lone surrogate ("\\ud800"), which no file can store."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Rejected(INVALID_JSON) from None
    return text


def _text(value: Any) -> str | None:
    """An id-like value as stripped text; None when missing, empty or not a scalar."""
    if isinstance(value, str):
        return _unicode(value.strip()) or None
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


def _epoch_micros(number: int | float) -> int | None:
    if isinstance(number, float) and not math.isfinite(number):
        return None
    scale = 1_000_000 if abs(number) < _EPOCH_SECONDS_BELOW else 1000
    return _micros_in_range(round(number * scale) if isinstance(number, float) else number * scale)


def _micros(value: Any) -> int | None:
    """Microseconds since the epoch (UTC) for any accepted time representation, else None."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if _EPOCH_NUMBER(text):
            return _epoch_micros(float(text) if "." in text else int(text))
        try:
            return _datetime_micros(datetime.fromisoformat(text))
        except ValueError:
            return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return _epoch_micros(value)
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
        (_unicode(k) if isinstance(k, str) else str(k), _unicode(v) if isinstance(v, str) else _property_text(v))
        for k, v in value.items()
        if v is not None
    ]
    items.sort()
    return items


def _revenue(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):  # Decimal: parquet's money columns
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise _Rejected(BAD_REVENUE) from None
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


def _derived_insert_id(
    user_id: str, event_type: str, event_time_us: int, event_properties: list, user_properties: list, revenue: float | None
) -> str:
    """A stable id for sources without one, so re-ingesting the same event deduplicates against itself: of every
    canonical field, so two events that differ in any (two purchases in one second, of different amounts) stay two."""
    iso = (_EPOCH + timedelta(microseconds=event_time_us)).isoformat(timespec="microseconds")
    payload = json.dumps([user_id, event_type, iso, event_properties, user_properties, revenue])
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
    iid = _text(insert_id) or _derived_insert_id(uid, etype, us, eprops, uprops, amount)
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
    if fmt in (None, "amplitude"):
        fast = _read_amplitude_vectorised(path, sniff=fmt is None)
        if fast is not None:
            return fast
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
# Amplitude exports, vectorised. Arrow's JSON reader parses the file with every field typed strictly (a field of
# another JSON type than expected, a repeated key, a line that is not one object: the file is read record by record);
# the records whose every value has a plain shape are canonicalised with Arrow kernels, and any record they cannot
# prove to handle exactly as _canonical does goes through the per-record path above. So the result (rows, order,
# duplicates, quarantine) is the per-record reader's, only faster.

_BLANK_BYTES = np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8)  # bytes.isspace()
_BLANK_AFTER_NEWLINE = re.compile(rb"\n[ \t\n\r\x0b\x0c]")
# Strings whose first and last characters are not whitespace for str.strip() (ASCII controls and space, C1 controls,
# no-break space, Unicode separators): for them _text is the string itself.
_STRIPPED = r"(?s)^[^\x00-\x20\x7f-\x{a0}\pZ](.*[^\x00-\x20\x7f-\x{a0}\pZ])?$"
# ISO times that datetime.fromisoformat reads and these kernels read alike (naive = UTC, as in _micros).
_ISO_TIME = (
    r"^(?P<date>[1-8]\d{3}-\d{2}-\d{2})[ T](?P<time>(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)(?:\.(?P<fraction>\d{1,6}))?"
    r"(?:Z|(?P<sign>[+-])(?P<zh>[01]\d|2[0-3]):(?P<zm>[0-5]\d))?$"
)
_EPOCH_DIGITS = r"^\d{1,14}$"  # epoch seconds or milliseconds as digits, all within int64 once in microseconds
_DECIMAL = r"^-?\d+(\.\d+)?$"  # revenue text that float() and Arrow's cast read alike
_ID_FIELDS = ("user_id", "device_id", "event_type", "event_time", "insert_id", "$insert_id", "uuid")
_AMPLITUDE_TYPES = pa.schema([*((name, pa.string()) for name in _ID_FIELDS), ("revenue", pa.float64())])


def _line_spans(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-blank lines of `data`; a line ends after its newline."""
    buffer = np.frombuffer(data, np.uint8)
    starts = np.concatenate([[0], np.flatnonzero(buffer == 10) + 1])
    ends = np.concatenate([starts[1:], [len(buffer)]])
    starts, ends = starts[ends > starts], ends[ends > starts]
    keep = ~np.isin(buffer[starts], _BLANK_BYTES)  # a line starting with a visible byte is not blank
    for row in np.flatnonzero(~keep):
        keep[row] = not data[starts[row] : ends[row]].isspace()
    return starts[keep], ends[keep]


def _count_lines(data: bytes) -> int:
    """The number of non-blank lines."""
    if data[:1].isspace() or _BLANK_AFTER_NEWLINE.search(data):
        return len(_line_spans(data)[0])
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)  # every line starts with a visible byte


def _string_bytes(strings: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """A string array's offsets (one more than its length) and bytes, as numpy views."""
    offsets = np.frombuffer(strings.buffers()[1], np.int32)[strings.offset : strings.offset + len(strings) + 1]
    return offsets, np.frombuffer(strings.buffers()[2], np.uint8)


def _visible_ends(strings: pa.StringArray) -> np.ndarray:
    """Strings whose first and last bytes are visible ASCII (! to ~): _STRIPPED holds for them without a regex."""
    offsets, data = _string_bytes(strings)
    filled = (offsets[1:] > offsets[:-1]) & _mask(pc.is_valid(strings))
    if not filled.any():
        return filled
    first, last = data[np.where(filled, offsets[:-1], 0)], data[np.where(filled, offsets[1:] - 1, 0)]
    return filled & (first > 0x20) & (first < 0x7F) & (last > 0x20) & (last < 0x7F)


# Amplitude's export format, checked byte by byte: what _ISO_TIME accepts among strings of this shape.
_EXPORT_TIME = np.frombuffer(b"DDDD-DD-DD DD:DD:DD.DDDDDD", np.uint8)
_EXPORT_DIGITS = _EXPORT_TIME == ord("D")


def _export_times(strings: pa.StringArray) -> np.ndarray | None:
    """The digit values of every string's `YYYY-MM-DD HH:MM:SS.ffffff` (rows x 26), or None when any string has
    another shape or a field out of _ISO_TIME's ranges."""
    offsets, data = _string_bytes(strings)
    if strings.null_count or not np.all(np.diff(offsets) == len(_EXPORT_TIME)):
        return None
    chars = data[offsets[:-1, None] + np.arange(len(_EXPORT_TIME), dtype=np.int32)]  # bytes: a few per row, not int64
    digits = chars.astype(np.int16) - ord("0")
    shaped = np.all(np.where(_EXPORT_DIGITS, (digits >= 0) & (digits <= 9), chars == _EXPORT_TIME), axis=1)
    year, hour = digits[:, 0], digits[:, 11] * 10 + digits[:, 12]
    in_range = (year >= 1) & (year <= 8) & (hour <= 23) & (digits[:, 14] <= 5) & (digits[:, 17] <= 5)
    return digits if np.all(shaped & in_range) else None


def _iso_micros(strings: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds of the leading `YYYY-MM-DD?HH:MM:SS` (ASCII digits, checked by _ISO_TIME) of each string, and
    whether that date exists (fromisoformat rejects 2026-02-30)."""
    offsets, data = _string_bytes(strings)
    return _digits_micros(data[offsets[:-1, None] + np.arange(19)].astype(np.int64) - ord("0"))


def _digits_micros(digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_iso_micros of the digit values of `YYYY-MM-DD?HH:MM:SS` (rows x at least 19 characters)."""

    def number(first: int, width: int) -> np.ndarray:
        return sum(digits[:, first + i].astype(np.int64) * 10 ** (width - 1 - i) for i in range(width))

    year, month, day = number(0, 4), number(5, 2), number(8, 2)
    valid = (month >= 1) & (month <= 12) & (day >= 1)
    start = ((year - 1970) * 12 + np.clip(month, 1, 12) - 1).astype("datetime64[M]")
    first_day = start.astype("datetime64[D]")
    valid &= day <= ((start + 1).astype("datetime64[D]") - first_day).astype(np.int64)
    days = first_day.astype(np.int64) + day - 1
    us = ((days * 24 + number(11, 2)) * 60 + number(14, 2)) * 60_000_000 + number(17, 2) * 1_000_000
    return (us + number(20, 6) if digits.shape[1] > 19 else us), valid


def _mask(array: pa.Array) -> np.ndarray:
    """A boolean array as numpy, null = False."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


class _Plain:
    """Vectorised _canonical over Arrow columns: values where a row's field has a plain shape, and `ok`, the rows all
    of whose fields did (the others go record by record)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.ok = np.ones(table.num_rows, bool)

    def column(self, name: str) -> pa.Array:
        if name in self.table.column_names:
            return self.table[name].combine_chunks()
        return pa.nulls(self.table.num_rows, _AMPLITUDE_TYPES.field(name).type if name in _AMPLITUDE_TYPES.names else pa.null())

    @staticmethod
    def present(strings: pa.Array) -> np.ndarray:
        """Not missing for _first / _text: neither null nor empty (whitespace-only strings are not plain, see text)."""
        return _mask(pc.not_equal(strings, ""))

    def text(self, strings: pa.Array, rows: np.ndarray) -> pa.Array:
        """_text of string values, required plain in `rows`."""
        unsure = rows & ~_visible_ends(strings)
        if unsure.any():
            plain = _mask(pc.match_substring_regex(strings.filter(pa.array(unsure)), _STRIPPED))
            self.ok[np.flatnonzero(unsure)[~plain]] = False
        return strings

    def micros(self, strings: pa.Array) -> np.ndarray:
        us = self._micros(strings)
        self.ok &= (us >= _MIN_US) & (us <= _MAX_US)  # outside: rejected record by record, as _micros_in_range does
        return us

    def _micros(self, strings: pa.Array) -> np.ndarray:
        export = _export_times(strings)
        if export is not None:  # a file in Amplitude's own time format throughout: no regex needed
            us, valid = _digits_micros(export)
            self.ok &= valid
            return us
        n = len(strings)
        out = np.zeros(n, np.int64)
        iso = _mask(pc.match_substring_regex(strings, _ISO_TIME))
        epoch = _mask(pc.match_substring_regex(strings, _EPOCH_DIGITS))
        self.ok &= iso | epoch
        if epoch.any():
            numbers = pc.cast(strings.filter(epoch), pa.int64()).to_numpy()
            out[epoch] = numbers * np.where(numbers < _EPOCH_SECONDS_BELOW, 1_000_000, 1000)
        if iso.any():
            strings = strings.filter(iso)
            us, valid = _iso_micros(strings)
            field = pc.extract_regex(strings, _ISO_TIME).field  # optional groups that did not match are ""
            us += pc.cast(pc.utf8_rpad(field("fraction"), 6, "0"), pa.int64()).to_numpy()
            hours, minutes = (pc.cast(pc.utf8_lpad(field(name), 1, "0"), pa.int64()).to_numpy() for name in ("zh", "zm"))
            offset = (hours * 60 + minutes) * 60_000_000
            us -= np.where(_mask(pc.equal(field("sign"), "-")), -offset, offset)
            out[iso] = us
            self.ok[np.flatnonzero(iso)[~valid]] = False
        return out

    def revenue(self, record: pa.Array, properties: pa.Array | None) -> pa.Array:
        """revenue, else _first(event_properties, "$revenue", "revenue"), as _revenue makes it."""
        n = len(record)
        values = np.full(n, np.nan)
        known = _mask(pc.is_valid(record))
        record_values = pc.fill_null(record, np.nan).to_numpy(zero_copy_only=False)
        values[known] = record_values[known]
        pending = ~known
        if properties is not None:
            for key in ("$revenue", "revenue"):
                if key not in [f.name for f in properties.type]:
                    continue
                child = pc.struct_field(properties, key)
                if pa.types.is_string(child.type):
                    blank = ~self.present(child)
                    number = _mask(pc.match_substring_regex(child, _DECIMAL))
                    take = pending & ~blank
                    self.ok &= ~take | number
                    parsed = pc.cast(pc.if_else(pa.array(number), child, "0"), pa.float64()).to_numpy(zero_copy_only=False)
                elif pa.types.is_integer(child.type) or pa.types.is_floating(child.type):
                    take = pending & _mask(pc.is_valid(child))
                    parsed = pc.cast(pc.fill_null(child, 0), pa.float64(), safe=False).to_numpy(zero_copy_only=False)
                elif pa.types.is_null(child.type):
                    continue
                else:
                    take = pending & _mask(pc.is_valid(child))
                    self.ok &= ~take
                    parsed = np.zeros(n)
                values[take] = parsed[take]
                pending &= ~take
        self.ok &= ~np.isinf(values)
        return pa.array(values, pa.float64(), mask=np.isnan(values))  # NaN, or none given: no revenue

    def properties(self, column: pa.Array) -> pa.Array:
        """_property_items of an object column as a map, keys sorted; values of other JSON types than string,
        boolean or integer are not plain."""
        n = len(column)
        if pa.types.is_null(column.type):
            return pa.MapArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.string()), pa.array([], pa.string()))
        if not pa.types.is_struct(column.type):
            self.ok &= ~_mask(pc.is_valid(column))
            return self.properties(pa.nulls(n))
        keys, texts = [], []
        for key in sorted(f.name for f in column.type):
            child = pc.struct_field(column, key)
            if pa.types.is_string(child.type):
                text = child
            elif pa.types.is_boolean(child.type):
                text = pc.if_else(child, "true", "false")
            elif pa.types.is_integer(child.type):
                text = pc.cast(child, pa.string())
            elif pa.types.is_null(child.type):
                continue
            else:
                self.ok &= ~_mask(pc.is_valid(child))
                continue
            keys.append(key)
            texts.append(text)
        if not keys:
            return self.properties(pa.nulls(n))
        present = np.stack([_mask(pc.is_valid(text)) for text in texts], axis=1)  # rows x keys
        row, key = np.nonzero(present)  # row-major: each row's entries in key order
        offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
        values = pa.concat_arrays([text.cast(pa.string()) for text in texts]).take(pa.array(key * n + row))
        return pa.MapArray.from_arrays(offsets, pa.array(keys, pa.string()).take(pa.array(key)), values)


def _read_amplitude_vectorised(path: Path, sniff: bool) -> IngestResult | None:
    """The Amplitude reader for files of one JSON object per line with plainly typed fields; None (read record by
    record instead) for anything else: a first line that is not JSON, other layouts, Segment messages, fields of
    unexpected JSON types, repeated keys, lines that are not one object."""
    import pyarrow.json as pa_json

    with _reading(path), _open_binary(path) as f:
        data = f.read()
    lines = (line for line in io.BytesIO(data) if not line.isspace())
    first = next(lines, None)
    try:
        json.loads(first or b"")
    except ValueError:
        return None
    if sniff and _sniff(_line_records(itertools.chain([first], lines)))[0] != "amplitude":
        return None
    try:
        table = pa_json.read_json(
            pa.BufferReader(data),
            read_options=pa_json.ReadOptions(block_size=1 << 24),
            parse_options=pa_json.ParseOptions(explicit_schema=_AMPLITUDE_TYPES, unexpected_field_behavior="infer"),
        )
    except pa.ArrowInvalid:
        return None
    if table.num_rows != _count_lines(data) or ("batch" in table.column_names and table["batch"].null_count < table.num_rows):
        return None  # several values on a line, or Segment batches: record numbers would differ
    plain = _Plain(table)
    column = plain.column
    user, device = column("user_id"), column("device_id")
    has_user, has_device = plain.present(user), plain.present(device)
    plain.ok &= has_user | has_device
    user_id = pc.if_else(
        pa.array(has_user), plain.text(user, has_user), pc.binary_join_element_wise("device:", plain.text(device, ~has_user & has_device), "")
    )
    event_type = column("event_type")
    plain.ok &= plain.present(event_type)
    plain.text(event_type, np.ones(len(event_type), bool))
    micros = plain.micros(column("event_time"))
    chosen = pa.nulls(table.num_rows, pa.string())
    undecided = np.ones(table.num_rows, bool)
    for name in ("insert_id", "$insert_id", "uuid"):
        candidate = column(name)
        here = undecided & plain.present(candidate)
        plain.text(candidate, here)
        chosen = pc.if_else(pa.array(here), candidate, chosen)
        undecided &= ~here
    plain.ok &= ~undecided  # no id at all: the derived id is computed record by record
    event_properties = column("event_properties")
    revenue = plain.revenue(column("revenue"), event_properties if pa.types.is_struct(event_properties.type) else None)
    fast_events = pa.Table.from_arrays(
        [
            user_id,
            event_type,
            pa.array(micros).cast(pa.timestamp("us", tz="UTC")),
            chosen,
            plain.properties(event_properties),
            plain.properties(column("user_properties")),
            revenue,
        ],
        names=EVENT_SCHEMA.names,
    ).filter(pa.array(plain.ok))
    fast_events = fast_events.cast(EVENT_SCHEMA)
    # The other records, one by one as the per-record reader reads them.
    collector = _Collector(path, _json_raw)
    slow_numbers = []
    slow_rows = np.flatnonzero(~plain.ok)
    starts, ends = _line_spans(data) if len(slow_rows) else (None, None)
    for row in slow_rows:
        records = list(_line_records([data[starts[row] : ends[row]]]))
        if len(records) != 1:
            return None
        raw, value = records[0]
        before = len(collector.rows)
        if isinstance(value, dict):
            collector.add(int(row) + 1, raw, _amplitude_fields, value)
        else:
            collector.reject(int(row) + 1, INVALID_JSON, raw)
        if len(collector.rows) > before:
            slow_numbers.append(int(row) + 1)
    slow = collector.result()  # deduplicated among themselves; across both kinds of record below
    events = fast_events
    if slow.events.num_rows:
        numbers = np.concatenate([np.flatnonzero(plain.ok) + 1, np.array(slow_numbers, np.int64)])
        events = pa.concat_tables([fast_events, slow.events]).take(np.argsort(numbers, kind="stable"))
    # The first occurrence of each insert_id wins, in file order.
    positions = events.select(["insert_id"]).append_column("row", pa.array(np.arange(events.num_rows)))
    first = positions.group_by("insert_id", use_threads=False).aggregate([("row", "min")]).column("row_min")
    kept = events.take(np.sort(first.to_numpy()))
    return IngestResult(events=kept, quarantine=slow.quarantine, duplicates=slow.duplicates + events.num_rows - kept.num_rows)


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
    # Python's csv module stops a whole file at a cell over 128 KiB; a long JSON properties cell is a valid one.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
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


CANONICAL_ORDER = [("event_time", "ascending"), ("insert_id", "ascending")]


def dedupe_events(*tables: pa.Table) -> pa.Table:
    """Union of EVENT_SCHEMA tables keeping the first row per insert_id (earlier arguments win), sorted by
    (event_time, insert_id) so the same input always gives the same output."""
    if not tables:
        return EVENT_SCHEMA.empty_table()
    combined = pa.concat_tables([table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA) for table in tables])
    positions = combined.select(["insert_id"]).append_column("row", pa.array(np.arange(combined.num_rows)))
    first = positions.group_by("insert_id", use_threads=False).aggregate([("row", "min")]).column("row_min")
    return combined.take(first).sort_by(CANONICAL_ORDER)
