import csv
import gzip
import hashlib
import json
from datetime import datetime, timezone
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from automl_assets.core.ingest import (
    FORMATS,
    ColumnMapping,
    IngestError,
    dedupe_events,
    detect_format,
    read_events,
)
from automl_assets.core.schema import EVENT_SCHEMA, QUARANTINE_SCHEMA

T0 = datetime(2026, 3, 1, 5, 6, 7, tzinfo=timezone.utc)


def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


def write_lines(path, records, compress=None):
    """Write JSON lines; str items are written verbatim so tests can include broken lines."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    compress = path.name.endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


def event(user_id, event_type, event_time, insert_id, event_properties=(), user_properties=(), revenue=None):
    return {
        "user_id": user_id,
        "event_type": event_type,
        "event_time": event_time,
        "insert_id": insert_id,
        "event_properties": list(event_properties),
        "user_properties": list(user_properties),
        "revenue": revenue,
    }


def expected_hash(user_id, event_type, event_time, event_properties, user_properties=(), revenue=None):
    iso = event_time.isoformat(timespec="microseconds")
    payload = json.dumps([user_id, event_type, iso, *([list(kv) for kv in props] for props in (event_properties, user_properties)), revenue])
    return "h:" + hashlib.sha1(payload.encode()).hexdigest()


# --- Amplitude --------------------------------------------------------------------------------------------------------


def test_amplitude_export_gives_canonical_rows(tmp_path):
    path = write_lines(
        tmp_path / "123_2026-03-01_5#0.json.gz",
        [
            {
                "event_type": "Purchase",
                "user_id": " u1 ",
                "device_id": "d1",
                "event_time": "2026-03-01 05:06:07.123456",
                "$insert_id": "a1",
                "uuid": "x1",
                "event_properties": {
                    "plan": "pro",
                    "count": 3,
                    "ratio": 2.5,
                    "ok": True,
                    "gone": None,
                    "nested": {"b": 1, "a": [1, 2]},
                    "$revenue": "9.99",
                },
                "user_properties": {"country": "DE"},
            },
            {"event_type": "view", "device_id": "dev-9", "event_time": 1772341567123, "uuid": "x2", "revenue": 5},
            {
                "event_type": "view",
                "user_id": "u2",
                "event_time": "2026-03-01T07:06:07+02:00",
                "insert_id": "i3",
                "revenue": None,
                "event_properties": {"revenue": 12},
            },
        ],
    )

    result = read_events(path)

    assert result.events.schema == EVENT_SCHEMA
    assert result.events.to_pylist() == [
        event(
            "u1",
            "Purchase",
            utc(2026, 3, 1, 5, 6, 7, 123456),
            "a1",
            [
                ("$revenue", "9.99"),
                ("count", "3"),
                ("nested", '{"a":[1,2],"b":1}'),
                ("ok", "true"),
                ("plan", "pro"),
                ("ratio", "2.5"),
            ],
            [("country", "DE")],
            9.99,
        ),
        event("device:dev-9", "view", utc(2026, 3, 1, 5, 6, 7, 123000), "x2", revenue=5.0),
        event("u2", "view", T0, "i3", [("revenue", "12")], revenue=12.0),
    ]
    assert result.quarantine.num_rows == 0
    assert result.duplicates == 0


def test_plain_json_lines_are_read_like_gzipped_ones(tmp_path):
    records = [{"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:06:07", "insert_id": "i1"}]
    gz = read_events(write_lines(tmp_path / "a.json.gz", records))
    plain = read_events(write_lines(tmp_path / "a.jsonl", records))
    assert plain.events.to_pylist() == gz.events.to_pylist() == [event("u1", "view", T0, "i1")]


@pytest.mark.parametrize(
    "event_time",
    [
        "2026-03-01 05:06:07",  # naive: UTC by convention
        "2026-03-01T05:06:07Z",
        "2026-03-01T07:06:07+02:00",
        "2026-03-01T00:06:07.000-05:00",
        1772341567000,
        "1772341567000",
        1772341567,  # epoch seconds
        "1772341567",
        1772341567.0,
        "1772341567.000",
    ],
)
def test_event_time_is_normalised_to_utc(tmp_path, event_time):
    path = write_lines(
        tmp_path / "a.json", [{"event_type": "view", "user_id": "u1", "event_time": event_time, "insert_id": "i"}]
    )
    assert read_events(path).events.column("event_time").to_pylist() == [T0]


def test_epoch_numbers_below_1e11_are_seconds_and_the_others_milliseconds(tmp_path):
    """Epoch seconds read as milliseconds would all land in January 1970; milliseconds below 10^11 would be before
    March 1973, when no product sent events."""
    times = [1772341567, 1772341567123, 10**11, 0, 10**11 - 1]
    path = write_lines(
        tmp_path / "a.json", [{"event_type": "view", "user_id": "u", "event_time": t, "insert_id": str(n)} for n, t in enumerate(times)]
    )
    result = read_events(path)
    assert result.events.column("event_time").to_pylist() == [
        T0, utc(2026, 3, 1, 5, 6, 7, 123000), utc(1973, 3, 3, 9, 46, 40), utc(1970, 1, 1)
    ]
    assert result.reason_counts() == {"bad_event_time": 1}  # 10^11 - 1 seconds is in the year 5138


def test_device_id_stands_in_for_a_missing_user_id(tmp_path):
    path = write_lines(
        tmp_path / "a.json",
        [
            {"event_type": "view", "user_id": "", "device_id": " d1 ", "event_time": "2026-03-01 05:06:07"},
            {"event_type": "view", "user_id": "   ", "device_id": "d2", "event_time": "2026-03-01 05:06:07"},
            {"event_type": "view", "device_id": "d3", "event_time": "2026-03-01 05:06:07"},
        ],
    )
    assert read_events(path).events.column("user_id").to_pylist() == ["device:d1", "device:d2", "device:d3"]


# --- Segment ----------------------------------------------------------------------------------------------------------

SEGMENT_MESSAGES = [
    {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": "anon-1",
        "messageId": "m1",
        "timestamp": "2026-03-01T06:06:07+01:00",
        "properties": {"revenue": 19.5, "sku": "A1", "qty": 2},
        "context": {"traits": {"plan": "pro"}, "ip": "1.2.3.4"},
    },
    {
        "type": "identify",
        "userId": "u1",
        "messageId": "m2",
        "timestamp": "2026-03-01T05:06:07Z",
        "traits": {"email": "a@example.com", "age": 31},
        "context": {"traits": {"ignored": "yes"}},
    },
    {
        "type": "page",
        "anonymousId": "anon-2",
        "name": "Pricing",
        "messageId": "m3",
        "originalTimestamp": "2026-03-01T05:06:07.5Z",
        "properties": {"path": "/pricing"},
        "context": {"traits": {"plan": "free"}},
    },
]

SEGMENT_EVENTS = [
    event(
        "u1",
        "Order Completed",
        T0,
        "m1",
        [("qty", "2"), ("revenue", "19.5"), ("sku", "A1")],
        [("plan", "pro")],
        19.5,
    ),
    event("u1", "$identify", T0, "m2", [], [("age", "31"), ("email", "a@example.com")]),
    event(
        "device:anon-2",
        "$page",
        utc(2026, 3, 1, 5, 6, 7, 500000),
        "m3",
        [("name", "Pricing"), ("path", "/pricing")],
        [("plan", "free")],
    ),
]


def test_segment_json_lines_give_canonical_rows(tmp_path):
    result = read_events(write_lines(tmp_path / "segment.jsonl", SEGMENT_MESSAGES))
    assert result.events.to_pylist() == SEGMENT_EVENTS
    assert result.quarantine.num_rows == 0


@pytest.mark.parametrize(
    "document",
    [
        json.dumps(SEGMENT_MESSAGES),
        json.dumps(SEGMENT_MESSAGES, indent=2),
        json.dumps({"batch": SEGMENT_MESSAGES, "sentAt": "2026-03-01T05:10:00Z"}, indent=2),
        json.dumps({"batch": SEGMENT_MESSAGES}),
    ],
    ids=["array", "pretty-array", "pretty-batch", "batch"],
)
def test_segment_array_and_batch_documents_give_the_same_rows(tmp_path, document):
    path = tmp_path / "segment.json"
    path.write_text(document)
    assert detect_format(path) == "segment"
    assert read_events(path).events.to_pylist() == SEGMENT_EVENTS


def test_segment_screen_and_unsupported_types(tmp_path):
    path = write_lines(
        tmp_path / "segment.jsonl",
        [
            {"type": "screen", "userId": "u1", "name": "Home", "messageId": "s1", "timestamp": "2026-03-01T05:06:07Z"},
            {"type": "group", "userId": "u1", "groupId": "g1", "messageId": "g", "timestamp": "2026-03-01T05:06:07Z"},
        ],
    )
    result = read_events(path, fmt="segment")
    assert result.events.to_pylist() == [event("u1", "$screen", T0, "s1", [("name", "Home")])]
    assert result.reason_counts() == {"unsupported_type": 1}


# --- CSV and parquet --------------------------------------------------------------------------------------------------

CSV_MAPPING = ColumnMapping(
    user_id="uid",
    device_id="device",
    event_type="action",
    event_time="ts",
    insert_id="id",
    event_properties="props",
    user_properties="traits",
    revenue="amount",
)


def test_csv_with_mapping_gives_canonical_rows(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "uid,device,action,ts,id,props,traits,amount,extra\n"
        'u1,d1,purchase,2026-03-01T06:06:07+01:00,e1,"{""sku"": ""A1"", ""qty"": 2}","{""plan"": ""pro""}",12.5,x\n'
        ",d2,view,2026-03-01 05:06:07,e2,,,,y\n"
        "\n"
        "u3,,view,2026-03-01 05:06:07,,,,,z\n"
    )

    result = read_events(path, mapping=CSV_MAPPING)

    assert result.events.to_pylist() == [
        event("u1", "purchase", T0, "e1", [("qty", "2"), ("sku", "A1")], [("plan", "pro")], 12.5),
        event("device:d2", "view", T0, "e2"),
        event("u3", "view", T0, expected_hash("u3", "view", T0, [])),
    ]
    assert result.quarantine.num_rows == 0


def test_csv_bad_rows_are_quarantined_and_good_rows_kept(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "uid,device,action,ts,id,props,traits,amount\n"
        "u1,,view,2026-03-01 05:06:07,e1,,,\n"
        "u2,,view,2026-03-01 05:06:07,e2,not json,,\n"
        "u3,,view,2026-03-01 05:06:07,e3,,,a lot\n"
        "u4,,view,2026-03-01 05:06:07,e4\n"
        ",,view,2026-03-01 05:06:07,e5,,,\n"
        "u6,,view,,e6,,,\n"
        "u7,,view,2026-03-01 05:06:07,e7,,,3\n"
    )

    result = read_events(path, mapping=CSV_MAPPING)

    assert result.events.column("insert_id").to_pylist() == ["e1", "e7"]
    assert result.reason_counts() == {
        "bad_event_time": 1,
        "bad_properties": 1,
        "bad_revenue": 1,
        "malformed_row": 1,
        "missing_user_id": 1,
    }
    assert result.quarantine.select(["record_number", "reason", "raw"]).to_pylist() == [
        {"record_number": 2, "reason": "bad_properties", "raw": "u2,,view,2026-03-01 05:06:07,e2,not json,,"},
        {"record_number": 3, "reason": "bad_revenue", "raw": "u3,,view,2026-03-01 05:06:07,e3,,,a lot"},
        {"record_number": 4, "reason": "malformed_row", "raw": "u4,,view,2026-03-01 05:06:07,e4"},
        {"record_number": 5, "reason": "missing_user_id", "raw": ",,view,2026-03-01 05:06:07,e5,,,"},
        {"record_number": 6, "reason": "bad_event_time", "raw": "u6,,view,,e6,,,"},
    ]


def test_csv_default_mapping(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,event_type,event_time\nu1,view,2026-03-01T05:06:07Z\n")
    assert read_events(path).events.to_pylist() == [event("u1", "view", T0, expected_hash("u1", "view", T0, []))]


def test_parquet_with_mapping_gives_canonical_rows(tmp_path):
    path = tmp_path / "transactions.parquet"
    table = pa.table(
        {
            "household_id": pa.array([7, None], pa.int64()),
            "basket": pa.array(["dev-1", "dev-2"]),
            "kind": pa.array(["purchase", "purchase"]),
            "transaction_timestamp": pa.array(
                [datetime(2026, 3, 1, 5, 6, 7, 123456), datetime(2026, 3, 1, 5, 6, 7)], pa.timestamp("ns")
            ),
            "txn": pa.array(["t1", "t2"]),
            "attrs": pa.array([[("store", "12"), ("coupon", "no")], []], pa.map_(pa.string(), pa.string())),
            "demo": pa.array(
                [{"age": "45-54", "kids": 2}, None], pa.struct([("age", pa.string()), ("kids", pa.int64())])
            ),
            "sales_value": pa.array([3.5, None], pa.float64()),
        }
    )
    pq.write_table(table, path)
    mapping = ColumnMapping.from_dict(
        {
            "user_id": "household_id",
            "device_id": "basket",
            "event_type": "kind",
            "event_time": "transaction_timestamp",
            "insert_id": "txn",
            "event_properties": "attrs",
            "user_properties": "demo",
            "revenue": "sales_value",
        }
    )

    result = read_events(path, mapping=mapping)

    assert result.events.to_pylist() == [
        event(
            "7",
            "purchase",
            utc(2026, 3, 1, 5, 6, 7, 123456),
            "t1",
            [("coupon", "no"), ("store", "12")],
            [("age", "45-54"), ("kids", "2")],
            3.5,
        ),
        event("device:dev-2", "purchase", T0, "t2"),
    ]


def test_parquet_bad_rows_are_quarantined_with_their_values(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u2"],
                "event_type": ["view", "view"],
                "event_time": ["2026-03-01T05:06:07Z", "soon"],
            }
        ),
        path,
    )
    result = read_events(path)
    assert result.events.column("user_id").to_pylist() == ["u1"]
    assert result.quarantine.to_pylist() == [
        {
            "source_file": str(path),
            "record_number": 2,
            "reason": "bad_event_time",
            "raw": '{"user_id": "u2", "event_type": "view", "event_time": "soon"}',
        }
    ]


def test_column_mapping_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown ColumnMapping keys: bogus, ts"):
        ColumnMapping.from_dict({"user_id": "uid", "ts": "time", "bogus": "x"})
    with pytest.raises(ValueError, match="event_time must be a non-empty column name"):
        ColumnMapping(event_time="")


# --- Quarantine -------------------------------------------------------------------------------------------------------


def test_every_quarantine_reason_is_counted_and_valid_rows_survive(tmp_path):
    ok = {"user_id": "u", "event_type": "view", "event_time": "2026-03-01 05:06:07"}
    path = write_lines(
        tmp_path / "export.json.gz",
        [
            {**ok, "insert_id": "first"},
            "{not json",
            "",
            '"just a string"',
            {"event_type": "view", "event_time": "2026-03-01 05:06:07", "user_id": None, "device_id": ""},
            {**ok, "event_type": "  "},
            {**ok, "event_time": "yesterday"},
            {"user_id": "u", "event_type": "view"},
            {**ok, "event_properties": "plan=pro"},
            {**ok, "user_properties": [1, 2]},
            {**ok, "revenue": "lots"},
            {**ok, "insert_id": "last"},
        ],
    )

    result = read_events(path)

    assert result.events.column("insert_id").to_pylist() == ["first", "last"]
    assert result.reason_counts() == {
        "bad_event_time": 2,
        "bad_properties": 2,
        "bad_revenue": 1,
        "invalid_json": 2,
        "missing_event_type": 1,
        "missing_user_id": 1,
    }
    assert result.quarantine.schema == QUARANTINE_SCHEMA
    assert result.quarantine.column("record_number").to_pylist() == list(range(2, 11))  # the blank line is no record
    assert set(result.quarantine.column("source_file").to_pylist()) == {str(path)}
    assert result.quarantine.column("raw").to_pylist()[:2] == ["{not json", '"just a string"']


def test_raw_text_is_truncated(tmp_path):
    path = write_lines(tmp_path / "a.json", ['{"broken": "' + "x" * 5000])
    (raw,) = read_events(path).quarantine.column("raw").to_pylist()
    assert raw == ('{"broken": "' + "x" * 5000)[:2000]


# --- Deduplication and the derived insert_id --------------------------------------------------------------------------


def test_duplicates_within_a_file_keep_the_first(tmp_path):
    base = {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01 05:06:07"}
    path = write_lines(
        tmp_path / "a.json",
        [
            {**base, "insert_id": "i1", "event_properties": {"v": "first"}},
            {**base, "insert_id": "i1", "event_properties": {"v": "second"}},
            base,
            base,  # no id: identical records derive the same id
            {**base, "event_properties": {"v": "other"}},
        ],
    )
    result = read_events(path)
    assert result.duplicates == 2
    assert result.events.column("event_properties").to_pylist() == [[("v", "first")], [], [("v", "other")]]


def test_derived_insert_id_is_stable_and_input_sensitive(tmp_path):
    base = {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01T06:06:07+01:00"}
    variants = [
        base,
        {**base, "event_properties": {"b": 2, "a": "x"}},
        {**base, "event_time": "2026-03-01T05:06:08Z"},
        {**base, "user_id": "u2"},
        {**base, "event_type": "click"},
        # two purchases in one second that differ only in amount or in a user property are two events
        {**base, "revenue": 10},
        {**base, "revenue": 250},
        {**base, "user_properties": {"plan": "pro"}},
    ]
    first = read_events(write_lines(tmp_path / "a.json", variants)).events.column("insert_id").to_pylist()
    again = read_events(write_lines(tmp_path / "b.json.gz", variants)).events.column("insert_id").to_pylist()

    assert first == again
    assert len(set(first)) == len(variants)
    assert first[0] == expected_hash("u1", "view", T0, [])
    assert first[1] == expected_hash("u1", "view", T0, [("a", "x"), ("b", "2")])
    # Property order in the source does not matter.
    reordered = {**base, "event_properties": {"a": "x", "b": 2}}
    assert read_events(write_lines(tmp_path / "c.json", [reordered])).events["insert_id"][0].as_py() == first[1]


def test_dedupe_events_across_files(tmp_path):
    base = {"user_id": "u1", "event_type": "view"}
    early = write_lines(
        tmp_path / "early.json",
        [
            {**base, "event_time": "2026-03-01 05:00:00", "insert_id": "b"},
            {**base, "event_time": "2026-03-01 04:00:00", "insert_id": "c", "event_properties": {"v": "early"}},
            {**base, "event_time": "2026-03-01 04:00:00", "insert_id": "a"},
        ],
    )
    late = write_lines(
        tmp_path / "late.json",
        [
            {**base, "event_time": "2026-03-01 04:00:00", "insert_id": "c", "event_properties": {"v": "late"}},
            {**base, "event_time": "2026-03-01 06:00:00", "insert_id": "d"},
        ],
    )
    early_events = read_events(early).events
    late_events = read_events(late).events

    merged = dedupe_events(early_events, late_events)

    assert merged.schema == EVENT_SCHEMA
    assert [(r["insert_id"], r["event_properties"]) for r in merged.to_pylist()] == [
        ("a", []),
        ("c", [("v", "early")]),
        ("b", []),
        ("d", []),
    ]
    # Ingesting the same file again adds nothing.
    assert dedupe_events(merged, read_events(early).events).equals(merged)
    assert dedupe_events(merged, merged).equals(merged)
    # Tables read back from the parquet event lake are accepted as they are.
    pq.write_table(merged, tmp_path / "lake.parquet")
    assert dedupe_events(pq.read_table(tmp_path / "lake.parquet"), late_events).equals(merged)
    # Argument order is priority.
    assert dedupe_events(late_events, early_events).to_pylist()[1]["event_properties"] == [("v", "late")]
    assert dedupe_events().num_rows == 0
    assert dedupe_events(EVENT_SCHEMA.empty_table()).schema == EVENT_SCHEMA


# --- Format detection and unreadable files ----------------------------------------------------------------------------


def test_detect_format(tmp_path):
    amplitude = write_lines(tmp_path / "a.json.gz", ["oops", {"event_type": "view", "user_id": "u"}])
    segment = write_lines(tmp_path / "s.jsonl", [{"type": "track", "event": "x"}])
    by_message_id = write_lines(tmp_path / "s.ndjson", [{"messageId": "m"}])
    assert detect_format(amplitude) == "amplitude"
    assert detect_format(segment) == "segment"
    assert detect_format(by_message_id) == "segment"
    assert detect_format(tmp_path / "x.csv") == "csv"
    assert detect_format(tmp_path / "x.parquet") == "parquet"
    assert set(FORMATS) == {"amplitude", "segment", "csv", "parquet"}


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
    path = tmp_path / "export.json.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(IngestError, match=r"export\.json\.gz: not a readable gzip file .* Re-download or re-export"):
        read_events(path)


def test_truncated_gzip_raises_naming_the_file(tmp_path):
    path = tmp_path / "export.json.gz"
    data = gzip.compress(b"".join(b'{"event_type": "view", "user_id": "u%d"}\n' % i for i in range(1000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match=r"export\.json\.gz: not a readable gzip file"):
        read_events(path)


def test_missing_mapped_column_raises_naming_file_column_and_field(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("a,b,c\n1,2,3\n")
    mapping = ColumnMapping(user_id="a", event_type="b", event_time="ts")
    with pytest.raises(
        IngestError,
        match=r"events\.csv: column 'ts' from the mapping is not in the file \(columns: a, b, c\)\. "
        r"Fix the mapping's event_time\.",
    ):
        read_events(path, mapping=mapping)


def test_parquet_missing_mapped_column_raises(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"uid": ["u"], "ts": ["2026-03-01"]}), path)
    with pytest.raises(
        IngestError,
        match=r"events\.parquet: columns 'event_type', 'rev' from the mapping are not in the file \(columns: uid, ts\)"
        r"\. Fix the mapping's event_type, revenue\.",
    ):
        read_events(path, mapping=ColumnMapping(user_id="uid", event_time="ts", revenue="rev"))


def test_unknown_extension_raises_naming_the_file(tmp_path):
    path = tmp_path / "events.txt"
    path.write_text("hello")
    with pytest.raises(IngestError, match=r"events\.txt: unknown file type\. .*pass fmt="):
        read_events(path)
    with pytest.raises(IngestError, match=r"events\.txt: unknown file type"):
        detect_format(path)
    with pytest.raises(IngestError, match=r"events\.txt: unknown format 'xml'\. Use one of amplitude"):
        read_events(path, fmt="xml")


def test_unreadable_files_raise_naming_the_file(tmp_path):
    with pytest.raises(IngestError, match=r"nowhere\.json: file not found"):
        read_events(tmp_path / "nowhere.json")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    with pytest.raises(IngestError, match=r"binary\.csv: not UTF-8 text"):
        read_events(binary)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(IngestError, match=r"empty\.csv: the file is empty"):
        read_events(empty)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nope")
    with pytest.raises(IngestError, match=r"broken\.parquet: not a readable parquet file"):
        read_events(broken)


def test_explicit_format_overrides_the_extension(tmp_path):
    path = write_lines(
        tmp_path / "dump.txt", [{"event_type": "view", "user_id": "u1", "event_time": "2026-03-01 05:06:07"}]
    )
    assert read_events(path, fmt="amplitude").events.column("user_id").to_pylist() == ["u1"]
    with pytest.raises(ValueError, match="csv and parquet sources only"):
        read_events(path, fmt="amplitude", mapping=ColumnMapping())


def test_odd_but_valid_values_are_quarantined_not_fatal_and_decimals_are_revenue(tmp_path):
    lines = [
        {"user_id": "u1", "event_type": "view", "event_time": "0001-01-01T00:00:00", "insert_id": "placeholder"},
        {"user_id": "u1", "event_type": "view", "event_time": "99999999999999", "insert_id": "year_5138"},
        {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01T05:06:07Z", "insert_id": "huge", "revenue": 10**400},
        {"user_id": "\ud800", "event_type": "view", "event_time": "2026-03-01T05:06:07Z", "insert_id": "surrogate"},
        {"user_id": "u1", "event_type": "view", "event_time": "2026-03-01T05:06:07Z", "insert_id": "ok"},
    ]
    path = tmp_path / "odd.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")  # json.dumps escapes the lone surrogate
    result = read_events(path)
    assert result.events["insert_id"].to_pylist() == ["ok"]
    assert result.reason_counts() == {"bad_event_time": 2, "bad_revenue": 1, "invalid_json": 1}

    money = pa.table({"uid": ["u1"], "name": ["buy"], "ts": ["2026-03-01 05:06:07"], "amount": pa.array([Decimal("12.34")], pa.decimal128(18, 2))})
    pq.write_table(money, tmp_path / "money.parquet")
    mapping = ColumnMapping(user_id="uid", event_type="name", event_time="ts", revenue="amount")
    assert read_events(tmp_path / "money.parquet", mapping=mapping).events["revenue"].to_pylist() == [12.34]


def test_a_csv_cell_over_128_kib_is_read(tmp_path):
    big = json.dumps({"note": "x" * 200_000})
    path = tmp_path / "big.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["uid", "name", "ts", "props"], ["u1", "view", "2026-03-01 05:06:07", big]])
    mapping = ColumnMapping(user_id="uid", event_type="name", event_time="ts", event_properties="props")
    assert read_events(path, mapping=mapping).events["event_properties"].to_pylist() == [[("note", "x" * 200_000)]]
