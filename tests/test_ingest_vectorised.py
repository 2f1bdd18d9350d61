"""The vectorised Amplitude reader gives exactly what the per-record reader gives, on plain files and odd ones."""

import gzip
import json
import random

import pyarrow as pa
import pytest

from automl_assets.core import ingest

ODD_TEXT = ["", " ", "u1", " u1", "u1 ", "\u00a0u1", "u1\u2003", "\x1cu", "José", "ü", "a\"b", "a\\b", "x y", "0", "-0"]
TIMES = [
    "2026-03-01 05:06:07",
    "2026-03-01T05:06:07.5",
    "2026-03-01 05:06:07.123456",
    "2026-03-01T05:06:07Z",
    "2026-03-01T07:06:07+02:00",
    "2026-03-01T00:06:07.000-05:00",
    "2026-02-30 05:06:07",
    "2026-03-01 24:00:00",
    "2026-03-01",
    "2026-03-01 05:06:07.1234567",
    " 2026-03-01 05:06:07",
    "yesterday",
    "1772341567000",
    "1772341567",  # seconds
    "99999999999",  # seconds, in the year 5138
    "100000000000",  # milliseconds, in 1973
    "-1772341567000",
    "99999999999999999",
    "0999-01-01 00:00:00",
]
PROPERTY_VALUES = {
    "string": ["a", "", " b ", "true", "1e5", '{"z":1}', "é"],
    "int": [0, -5, 3, 2**40, 2**63 - 1],
    "float": [2.5, 0.1, 1e20, 1e-7, 100.0, -0.0],
    "bool": [True, False],
    "nested": [{"b": 1, "a": [1, 2]}, [1, "x"]],
}
REVENUES = {
    "int": [0, 12, -3],
    "float": [9.99, 0.5, 1e300],
    "string": ["9.99", "", " ", "lots", "1e3", "-2", "007"],
}


def _value(rng, kind, pool):
    return None if rng.random() < 0.15 else rng.choice(pool[kind])


def _file_records(rng):
    """Records whose fields keep one JSON type each within the file (as Arrow's reader needs), with odd values."""
    kinds = {
        "ids": rng.choice(["string", "string", "int"]),
        "time": rng.choice(["string", "string", "int"]),
        "props": {key: rng.choice(list(PROPERTY_VALUES)) for key in rng.sample(["a", "b", "$revenue", "revenue", "é"], 3)},
        "revenue": rng.choice(list(REVENUES)),
    }
    records = []
    for n in range(rng.randint(1, 40)):
        record = {"event_type": rng.choice(["view", "buy", " view", ""]) if rng.random() < 0.3 else "view"}
        for key in ("user_id", "device_id", "insert_id", "$insert_id", "uuid"):
            if rng.random() < 0.7:
                if kinds["ids"] == "int":
                    record[key] = rng.choice([n % 4, 7, None])
                else:
                    record[key] = rng.choice(ODD_TEXT + [f"id{n % 5}"] * 4 + [None])
        if kinds["time"] == "int":
            record["event_time"] = rng.choice([1772341567000, 1772341567123, 0])
        else:
            record["event_time"] = rng.choice(TIMES[:6] * 3 + TIMES)
        if rng.random() < 0.8:
            record["event_properties"] = {
                key: _value(rng, kind, PROPERTY_VALUES) for key, kind in kinds["props"].items() if rng.random() < 0.7
            }
        if rng.random() < 0.5:
            record["user_properties"] = {"plan": rng.choice(["free", "pro", None])}
        if rng.random() < 0.4:
            record["revenue"] = _value(rng, kinds["revenue"], REVENUES)
        records.append(record)
    return records


def _write(path, records, rng):
    lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records]
    if rng.random() < 0.2:
        lines.insert(rng.randrange(len(lines) + 1), "   ")
    if rng.random() < 0.1:
        lines.insert(rng.randrange(1, len(lines) + 1), "{not json")
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def _per_record(path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "_read_amplitude_vectorised", lambda path, sniff: None)
        return ingest.read_events(path)


def _same(fast, slow):
    assert fast.events.equals(slow.events)
    assert fast.events.to_pylist() == slow.events.to_pylist()
    assert fast.quarantine.equals(slow.quarantine)
    assert fast.duplicates == slow.duplicates


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_reader_matches_the_per_record_reader(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    for n in range(10):
        path = _write(tmp_path / f"export_{n}.json.gz", _file_records(rng), rng)
        _same(ingest.read_events(path), _per_record(path, monkeypatch))


def test_plain_export_takes_the_vectorised_path(tmp_path, monkeypatch):
    records = [
        {
            "event_type": "view",
            "user_id": f"u{n % 7}",
            "device_id": None,
            "event_time": f"2026-03-01 05:{n % 60:02d}:07.{n:06d}",
            "event_properties": {"page": "home", "n": n, "ok": n % 2 == 0},
            "user_properties": {"plan": "pro"},
            "insert_id": f"i{n % 90}",
            **({"revenue": n / 4} if n % 3 == 0 else {}),
        }
        for n in range(100)
    ]
    path = tmp_path / "export.json.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))

    fast = ingest._read_amplitude_vectorised(path, sniff=True)

    assert fast is not None and fast.events.num_rows == 90 and fast.duplicates == 10
    _same(fast, _per_record(path, monkeypatch))


EXPORT_TIMES = ["2026-03-01 05:06:07.123456", "2024-02-29 23:59:59.999999", "1970-01-01 00:00:00.000000"]
ODD_EXPORT_TIMES = [
    "2026-02-30 05:06:07.000000",  # the shape, but no such day
    "2026-03-01 24:00:00.000000",
    "2026-03-01 05:60:07.000000",
    "2026-03-01 05:06:60.000000",
    "0999-01-01 00:00:00.000000",
    "9000-01-01 00:00:00.000000",
    "2026-03-01T05:06:07.000000",
    "2026-03-01 05:06:07.12345x",
    "2026-03-01 05:06:07.1234567",
]


@pytest.mark.parametrize("odd", [None, *ODD_EXPORT_TIMES])
def test_export_times_and_ids_read_without_regexes_match_the_per_record_reader(tmp_path, monkeypatch, odd):
    """Amplitude's own time format and visibly plain ids skip the regexes; anything else in a file sends its times
    (or that id) through them, with the same result."""
    ids = ["u1", "José", " u2", "u3\u2003", "\x1cu", "x y", "é"]
    records = [
        {"event_type": "view", "user_id": ids[n % len(ids)], "event_time": EXPORT_TIMES[n % 3], "insert_id": f"i{n}"}
        for n in range(30)
    ]
    if odd:
        records[7]["event_time"] = odd
    path = tmp_path / "export.json.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))

    fast = ingest._read_amplitude_vectorised(path, sniff=True)

    assert fast is not None
    _same(fast, _per_record(path, monkeypatch))
    takes_the_byte_path = odd in (None, ODD_EXPORT_TIMES[0])  # a day that does not exist is caught after it
    assert (ingest._export_times(pa.array([r["event_time"] for r in records])) is not None) == takes_the_byte_path


def test_layouts_it_does_not_read_go_record_by_record(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"event_type": "view", "user_id": "u", "event_time": "2026-03-01 05:06:07"}]))
    two_per_line = tmp_path / "two.json"
    two_per_line.write_text('{"event_type": "v", "user_id": "u", "event_time": "2026-03-01 05:06:07"} {"a": 1}\n')
    mixed_types = tmp_path / "mixed.json"
    mixed_types.write_text('{"event_type": "v", "user_id": "u"}\n{"event_type": "v", "user_id": 5}\n')
    segment = tmp_path / "segment.json"
    segment.write_text('{"type": "track", "event": "x", "userId": "u", "messageId": "m"}\n')
    for path in (array, two_per_line, mixed_types, segment):
        assert ingest._read_amplitude_vectorised(path, sniff=True) is None
