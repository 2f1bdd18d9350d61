"""The hour-partitioned event lake: staging raw files once, and merging them into hour files without duplicates.

A landing file is parsed once (keyed by the digest of its bytes) into per-hour chunks under staging/; an hour of the
event store is the deduplicated union of its current file and every staged chunk of that hour. Both steps are
idempotent, so ingesting the same file twice, or re-running an hour, changes nothing.
"""

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from automl_assets.core import layout
from automl_assets.core.ingest import CANONICAL_ORDER, ColumnMapping, IngestError, dedupe_events, read_events
from automl_assets.core.schema import EVENT_SCHEMA
from automl_assets.core.timewin import from_epoch_hour, hour_token

MAPPING_FILE = "_mapping.json"  # a landing folder's column mapping for its CSV/parquet files
_MICROS_PER_HOUR = 3_600_000_000


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def slices_by_key(table: pa.Table, keys: np.ndarray) -> dict[int, pa.Table]:
    """Rows grouped by an integer key per row (one stable sort, then slices: linear in the table)."""
    if table.num_rows == 0:
        return {}
    if np.all(keys[1:] >= keys[:-1]):  # already in key order (canonical events are sorted by time): no copy
        ordered, sorted_keys = table, keys
    else:
        order = np.argsort(keys, kind="stable")
        ordered, sorted_keys = table.take(pa.array(order)), keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(sorted_keys)]])
    return {int(sorted_keys[s]): ordered.slice(s, e - s) for s, e in zip(starts, ends)}


def split_by_hour(table: pa.Table) -> dict[datetime, pa.Table]:
    """Events grouped by the UTC hour of event_time."""
    micros = pc.cast(table["event_time"], pa.int64()).to_numpy() if table.num_rows else np.array([], dtype=np.int64)
    return {from_epoch_hour(key): chunk for key, chunk in slices_by_key(table, micros // _MICROS_PER_HOUR).items()}


def _stored_hour_at(storage, position: int) -> datetime | None:
    hours = storage.list_dir(*layout.events_root())  # sorted, and hour names sort in time order
    return layout.folder_hour(hours[position]) if hours else None


def oldest_stored_hour(storage) -> datetime | None:
    """The first hour in the event store: where its history starts."""
    return _stored_hour_at(storage, 0)


def newest_stored_hour(storage) -> datetime | None:
    """The newest hour in the event store."""
    return _stored_hour_at(storage, -1)


def landing_files(storage) -> list[Path]:
    root = Path(storage.path(*layout.landing()))
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))


def _mapping_for(path: Path) -> ColumnMapping | None:
    mapping_file = path.parent / MAPPING_FILE
    return ColumnMapping.from_dict(json.loads(mapping_file.read_text())) if mapping_file.exists() else None


def stage_file(
    storage, path: Path, fmt: str | None = None, mapping: ColumnMapping | None = None, digest: str | None = None
) -> dict:
    """Parse one raw file into staged hour chunks and its quarantine; returns its manifest. A file already staged
    (same bytes) is not parsed again. `digest`, when the caller knows the file's, saves hashing it."""
    digest = digest or file_digest(path)
    manifest_parts = layout.staged_manifest(digest)
    if storage.exists(*manifest_parts):
        return dict(storage.read_json(*manifest_parts), newly_staged=False)
    result = read_events(path, fmt, mapping or _mapping_for(path))
    # Chunks in the store's canonical form (read_events has deduplicated them; dedupe_events' order and schema), so
    # an hour that only this file fills is its chunk, copied as it is.
    canonical = result.events.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA).sort_by(CANONICAL_ORDER)
    chunks = split_by_hour(canonical)
    for hour, chunk in chunks.items():
        storage.write_table(chunk, *layout.staged_hour(digest, hour))
    if result.quarantine.num_rows:
        storage.write_table(result.quarantine, *layout.quarantine(digest))
    manifest = {
        "source": str(path),
        "digest": digest,
        "hours": sorted(hour_token(hour) for hour in chunks),
        "events": result.events.num_rows,
        "duplicates_in_file": result.duplicates,
        "quarantined": result.reason_counts(),
    }
    # The manifest is written last: its presence means the file is staged completely.
    storage.write_json(manifest, *manifest_parts)
    return dict(manifest, newly_staged=True)


def _in_parallel(function, items: list) -> list:
    """`function` of each item, in order, on a few threads: reading JSON and parquet, Arrow kernels and compression
    release the GIL, so files and hours are processed side by side."""
    workers = min(4, os.cpu_count() or 1, len(items))
    if workers < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def landing_marker(path: Path) -> str:
    """What identifies a landing file's state for the landing sensor: its size and time, and its folder mapping's
    (a mapping added to fix an unreadable file has it read again)."""
    stat = path.stat()
    mapping = path.parent / MAPPING_FILE
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}" + (f"|{mapping.stat().st_mtime_ns}" if mapping.exists() else "")


def stage_landing_file(storage, path: Path) -> dict:
    """stage_file for a file found under landing/: one that cannot be read gives a manifest with its `error` (the
    file, the problem and what to do) instead of stopping every other file's ingestion. It is read again when the
    file or its folder's mapping changes. A file staged before, unchanged since (size and time), is not read at all:
    every ingest run looks at every file kept under landing/, and hashing them all would grow with the history."""
    index = layout.landing_index(hashlib.sha256(str(path).encode()).hexdigest()[:20])
    try:
        marker = landing_marker(path)
        known = storage.read_json(*index) if storage.exists(*index) else None
        known_digest = known["digest"] if known and known["marker"] == marker else None
        manifest = stage_file(storage, path, digest=known_digest)
    except (IngestError, OSError) as error:  # OSError: unreadable, or removed while it was listed
        return {"source": str(path), "hours": [], "events": 0, "quarantined": {}, "newly_staged": False, "error": str(error)}
    if known_digest is None:
        storage.write_json({"marker": marker, "digest": manifest["digest"]}, *index)
    return manifest


def stage_landing(storage) -> list[dict]:
    return _in_parallel(lambda path: stage_landing_file(storage, path), landing_files(storage))


def quarantined_in_hours(manifests: list[dict], hours: list[datetime]) -> dict[str, int]:
    """Quarantined records by reason, summed over the files that have events in `hours`: what an ingest run of those
    hours reports, whoever staged the files (the landing sensor and `automl ingest` stage them before the run)."""
    tokens = {hour_token(hour) for hour in hours}
    counts: Counter = Counter()
    for manifest in manifests:
        if tokens.intersection(manifest["hours"]):
            counts.update(manifest["quarantined"])
    return dict(sorted(counts.items()))


def staged_manifests(storage) -> list[dict]:
    manifests = []
    for digest in storage.list_dir("staging"):
        parts = layout.staged_manifest(digest)
        if storage.exists(*parts):
            manifests.append(storage.read_json(*parts))
    return manifests


def merge_hours(storage, hours: list[datetime], manifests: list[dict]) -> dict[str, int]:
    """Rewrite each hour of the store as its deduplicated union with the staged chunks of that hour."""
    chunks_by_hour: dict[str, list[str]] = {}
    for manifest in manifests:
        for token in manifest["hours"]:
            chunks_by_hour.setdefault(token, []).append(manifest["digest"])

    def stored_rows(target: tuple[str, ...]) -> int:
        return pq.read_metadata(storage.path(*target)).num_rows if storage.exists(*target) else 0

    def merge(hour: datetime) -> Counter:
        target = layout.events_hour(hour)
        chunk_parts = [layout.staged_hour(d, hour) for d in sorted(chunks_by_hour.get(hour_token(hour), []))]
        if not chunk_parts:  # nothing new for this hour: it stays as it is
            events = stored_rows(target)
            return Counter(hours_with_events=1, events=events, new_events=0, duplicates_dropped=0) if events else Counter()
        # Two ingest runs may merge the same hour (the hourly schedule and the landing sensor): one at a time, or
        # the later write would drop the events only the other had read. The lock is a hidden file beside the
        # hour's folder.
        with storage.exclusive(*target[:-1]):
            return merge_chunks(target, chunk_parts)

    def merge_chunks(target: tuple[str, ...], chunk_parts: list[tuple[str, ...]]) -> Counter:
        if not storage.exists(*target) and len(chunk_parts) == 1:
            # A new hour from one file (the usual first ingest): its staged chunk is already the merged hour.
            storage.copy(chunk_parts[0], target)
            events = stored_rows(target)
            return Counter(hours_with_events=1, events=events, new_events=events, duplicates_dropped=0)
        existing = storage.read_table(*target) if storage.exists(*target) else None
        staged = [storage.read_table(*parts) for parts in chunk_parts]
        before = existing.num_rows if existing is not None else 0
        merged = dedupe_events(*([existing] if existing is not None else []), *staged)
        if existing is None or merged.num_rows != before:
            storage.write_table(merged, *target)
        return Counter(
            hours_with_events=1,
            events=merged.num_rows,
            new_events=merged.num_rows - before,
            duplicates_dropped=sum(t.num_rows for t in staged) - (merged.num_rows - before),
        )

    totals: Counter = Counter()
    for counts in _in_parallel(merge, hours):
        totals.update(counts)  # keeps zero counts, unlike +
    return dict(totals)


def write_events(storage, table: pa.Table) -> list[datetime]:
    """Write canonical events straight into the store (generators, benchmarks), deduplicated with what is there."""
    table = table.cast(EVENT_SCHEMA)
    touched = []
    for hour, chunk in split_by_hour(table).items():
        target = layout.events_hour(hour)
        merged = dedupe_events(storage.read_table(*target), chunk) if storage.exists(*target) else dedupe_events(chunk)
        storage.write_table(merged, *target)
        touched.append(hour)
    return touched
