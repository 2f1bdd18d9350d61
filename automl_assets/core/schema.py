"""The canonical event schema of the event store (see docs/design.md)."""

import pyarrow as pa

PROPERTY_MAP = pa.map_(pa.string(), pa.string())

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("insert_id", pa.string(), nullable=False),
        pa.field("event_properties", PROPERTY_MAP),
        pa.field("user_properties", PROPERTY_MAP),
        pa.field("revenue", pa.float64()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source_file", pa.string()),
        pa.field("record_number", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
    ]
)
