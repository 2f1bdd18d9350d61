"""Deterministic synthetic behavioural events with planted, learnable signal.

Users are simulated per day, vectorised over a block of users: a latent engagement and a latent purchase intent
evolve as AR(1) processes, daily session counts are Poisson draws from them, and each session's events are drawn
per session and then expanded to rows. Two outcomes are planted so that they can be predicted from observable counts:

* purchase: a session's purchase probability rises with the user's view_item / add_to_cart / begin_checkout counts
  of the previous days (an exponentially decaying sum), with electronics views and with plan=pro;
* churn: some users enter a decay phase in which sessions fade and support tickets rise; it ends with
  ``subscription_cancelled``, after which the user emits nothing.

Every random draw comes from a generator seeded by ``(seed, block of users)``, so the output depends only on the
config, not on how the caller chunks it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from automl_assets.core.schema import EVENT_SCHEMA, PROPERTY_MAP

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US
_NEVER = np.iinfo(np.int64).max

# Users are simulated in fixed blocks, each with its own random stream: output is independent of chunk_users.
_BLOCK_USERS = 16_384
_TABLE_ROWS = 1_000_000  # rows per Arrow table built in parallel by generate_table
_EXPORT_BATCH_ROWS = 500_000  # rows per batch of JSON lines: keeps each string array far below 2 GiB
_R = TypeVar("_R")

EVENT_TYPES = (
    "session_start",
    "page_view",
    "search",
    "view_item",
    "add_to_cart",
    "remove_from_cart",
    "view_cart",
    "begin_checkout",
    "purchase",
    "add_to_wishlist",
    "share",
    "rate_item",
    "open_notification",
    "settings_change",
    "support_ticket",
    "invite_friend",
    "plan_changed",
    "subscription_cancelled",
)
_T = {name: code for code, name in enumerate(EVENT_TYPES)}
# Internal code for a view_item of an electronics item: the purchase model needs to count those separately.
_ELEC_VIEW = len(EVENT_TYPES)
_TYPE_NAMES = pa.array([*EVENT_TYPES, "view_item"])

PLATFORMS = ("ios", "android", "web")
_PLATFORM_W = (0.45, 0.35, 0.20)
_PAGE_VIEWS_PER_SESSION = np.array([2.2, 2.0, 3.2])  # by platform: web sessions browse more pages

COUNTRIES = ("US", "IN", "GB", "DE", "BR", "FR", "CA", "JP", "ES", "AU")
_COUNTRY_W = (0.32, 0.14, 0.10, 0.09, 0.08, 0.07, 0.06, 0.05, 0.05, 0.04)
_COUNTRY_UTC_OFFSET_H = np.array([-5, 5.5, 0, 1, -3, 1, -5, 9, 1, 10])

PLANS = ("free", "plus", "pro")
_PLAN_W = (0.70, 0.20, 0.10)
_PRO = PLANS.index("pro")

CATEGORIES = ("electronics", "fashion", "home", "beauty", "sports", "books", "toys", "grocery")
_NON_ELEC_W = (0.24, 0.18, 0.14, 0.12, 0.12, 0.10, 0.10)
_CATEGORY_MEDIAN_PRICE = np.array([180.0, 45.0, 60.0, 25.0, 50.0, 15.0, 30.0, 8.0])
_N_ITEMS = 4_000  # high-cardinality item_id: item k belongs to category k % 8
PRICE_BANDS = ("low", "mid", "high")

PAGES = ("home", "search_results", "category", "item", "cart", "account", "deals", "help")
_PAGE_W = (0.30, 0.18, 0.16, 0.14, 0.08, 0.06, 0.05, 0.03)
_PAYMENT = ("card", "paypal", "apple_pay", "google_pay")
_CHANNELS = ("whatsapp", "email", "copy_link", "social")
_RATINGS = ("1", "2", "3", "4", "5")
_RATING_W = (0.05, 0.07, 0.15, 0.33, 0.40)
_CAMPAIGNS = ("welcome", "weekly_digest", "price_drop", "back_in_stock", "cart_reminder", "win_back")
_SETTINGS = ("notifications", "privacy", "language", "theme", "payment")
_TOPICS = ("billing", "bug", "account", "delivery", "refund")
_REASONS = ("too_expensive", "not_using", "switched_service", "missing_features", "other")
_QUANTITIES = ("1", "2", "3")
_QUANTITY_W = (0.80, 0.15, 0.05)

# Events with no funnel role, drawn per session from one mix.
_BACKGROUND_TYPES = np.array(
    [_T[t] for t in ("open_notification", "add_to_wishlist", "view_cart", "share", "rate_item", "settings_change",
                     "invite_friend", "support_ticket")]
)
_BACKGROUND_W = (0.30, 0.20, 0.18, 0.10, 0.10, 0.05, 0.04, 0.03)
_BACKGROUND_PER_SESSION = 0.5

# Local hour-of-day activity (evening peak, quiet night).
_HOUR_W = (1.0, 0.6, 0.4, 0.3, 0.3, 0.5, 1.0, 1.8, 2.4, 2.6, 2.6, 2.7,
           2.9, 2.8, 2.6, 2.6, 2.7, 3.0, 3.4, 3.8, 4.0, 3.6, 2.6, 1.6)

# Simulation parameters (rates per day unless noted).
_ACTIVITY_SIGMA = 1.3  # lognormal spread of per-user activity: the top 1% of users emit ~20% of the events
_EVENTS_PER_SESSION = 6.8  # measured: converts events_per_user_per_week (per week alive) into a session rate
_PRE_EXISTING = 0.5  # share of users who joined before the history starts; the rest join uniformly within it
_ENGAGEMENT_RHO, _ENGAGEMENT_SD = 0.9, 0.5
_INTENT_RHO, _INTENT_SD, _INTENT_USER_SD = 0.9, 0.7, 0.5
_FUNNEL_MEMORY = 0.85  # daily decay of the funnel activity that drives purchases (half-life ~4 days)
_CHURN_HAZARD = 0.006  # daily probability of entering the decay phase at activity 1, before the plan factor
_PLAN_CHURN = np.array([1.2, 0.8, 0.6])
_DECAY_PER_DAY = 0.88
_DECAY_DAYS = (7, 22)  # decay phase length in days, [low, high)
_DECAY_TICKETS_PER_DAY = 0.15
_PLAN_CHANGE_SHARE = 0.06
_ELEC_FAN_SHARE, _ELEC_FAN_P, _ELEC_OTHER_P = 0.25, 0.5, 0.06
_FAVOURITE_SHARE = 0.55  # share of a user's non-electronics item events in their favourite category


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """What to generate: events of ``n_users`` simulated users in ``[end - weeks, end)``.

    Users whose activity falls outside the window (e.g. cancelled before it) emit nothing, so fewer than ``n_users``
    distinct users can appear.
    """

    n_users: int = 500
    end: datetime
    weeks: int = 10
    seed: int = 0
    events_per_user_per_week: float = 6.0

    def __post_init__(self) -> None:
        if self.end.tzinfo is None or self.end.utcoffset() is None:
            raise ValueError("end must be timezone-aware")
        if self.n_users < 0 or self.weeks < 1 or self.seed < 0 or self.events_per_user_per_week <= 0:
            raise ValueError("n_users, seed must be >= 0, weeks >= 1 and events_per_user_per_week > 0")
        object.__setattr__(self, "end", self.end.astimezone(timezone.utc))

    @property
    def start(self) -> datetime:
        return self.end - timedelta(weeks=self.weeks)


def generate_events(
    config: SyntheticConfig, chunk_users: int = 200_000, threads: int | None = None
) -> Iterator[pa.Table]:
    """Yield EVENT_SCHEMA tables, one per ``chunk_users`` consecutive users, each sorted by user and time.

    Their concatenation is the same for any ``chunk_users`` and ``threads``; chunks without events are skipped.
    Blocks of users are simulated on ``threads`` threads (default: the CPU count, at most 4): numpy and Arrow
    release the GIL for most of the work, and at most ``threads`` finished blocks wait in memory.
    """
    if chunk_users < 1:
        raise ValueError("chunk_users must be >= 1")
    world = _World(config)
    pending: list[pa.Table] = []
    chunk_end = chunk_users

    def build(events: _Events) -> tuple[pa.Table, np.ndarray]:
        return _to_table(events, world), events.user

    for hi, (table, users) in _blocks(world, threads, build):
        while chunk_end < hi:
            cut = int(np.searchsorted(users, chunk_end))
            pending.append(table.slice(0, cut))
            if chunk := _concat(pending):
                yield chunk
            pending = []
            table, users = table.slice(cut), users[cut:]
            chunk_end += chunk_users
        pending.append(table)
    if chunk := _concat(pending):
        yield chunk


def generate_table(config: SyntheticConfig, threads: int | None = None) -> pa.Table:
    """All events of ``config`` in one table, sorted by event_time then insert_id.

    Sorted as numeric codes before any string is built: sorting the finished table would move map columns, which
    Arrow does slowly. For tens of millions of events prefer streaming ``generate_events``.
    """
    world = _World(config)
    events = _Events.concat([events for _, events in _blocks(world, threads, lambda events: events)])
    events = events.take(_time_order(events))
    bounds = range(0, len(events.user), _TABLE_ROWS)
    with ThreadPoolExecutor(_threads(threads)) as pool:
        tables = pool.map(lambda lo: _to_table(events.take(slice(lo, lo + _TABLE_ROWS)), world), bounds)
        return pa.concat_tables([EVENT_SCHEMA.empty_table(), *tables])


def write_amplitude_export(table: pa.Table, directory: str | os.PathLike, prefix: str = "synthetic") -> list[Path]:
    """Write ``table`` as an Amplitude export: gzipped JSON lines, one file per UTC hour of event_time.

    Files are named ``{prefix}_{YYYY-MM-DD}_{H}#{n}.json.gz`` like Amplitude's (hour not zero-padded). ``n`` is 0
    unless the directory already holds files of that hour, then the next free number: the chunks of
    ``generate_events`` can be written one after another into one directory (writing the same events twice
    duplicates them; ingestion drops duplicates by insert_id). Lines follow event_time, insert_id order; ``revenue``
    appears only when not null. Returns the written paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not table.num_rows:
        return []
    order = pc.sort_indices(table, sort_keys=[("event_time", "ascending"), ("insert_id", "ascending")]).to_numpy()
    hours = table["event_time"].cast(pa.int64()).to_numpy()[order] // _HOUR_US
    starts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])
    stops = np.r_[starts[1:], len(order)]
    next_part = _next_export_parts(directory, prefix)
    paths = []
    for begin in starts:
        hour = _EPOCH + timedelta(hours=int(hours[begin]))
        name = f"{prefix}_{hour:%Y-%m-%d}_{hour.hour}"
        paths.append(directory / f"{name}#{next_part.get(name, 0)}.json.gz")

    with ThreadPoolExecutor(_threads(None)) as pool:
        # Lines are built in input order and then reordered: moving strings is cheap, moving map columns is not.
        # One large_string array (64-bit offsets): take on a multi-chunk array would concatenate it on every call.
        batches = pool.map(
            lambda lo: _json_lines(table.slice(lo, _EXPORT_BATCH_ROWS)).cast(pa.large_string()),
            range(0, table.num_rows, _EXPORT_BATCH_ROWS),
        )
        lines = pa.concat_arrays(list(batches))

        def write(path: Path, begin: int, stop: int) -> None:
            tmp = path.with_name(f".{path.name}.tmp")  # a leading dot: the landing sensor skips it until renamed
            # Level 3: several times faster than gzip's default 9 for ~30% larger files; mtime=0 keeps bytes stable.
            with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", compresslevel=3, fileobj=raw, mtime=0) as gz:
                gz.write(_string_bytes(lines.take(order[begin:stop])))
            tmp.replace(path)  # readers never see a half-written file

        list(pool.map(write, paths, starts, stops))
    return paths


def _next_export_parts(directory: Path, prefix: str) -> dict[str, int]:
    """For each ``{prefix}_{date}_{hour}`` with files in ``directory``, the next unused part number."""
    pattern = re.compile(re.escape(prefix) + r"_(\d{4}-\d{2}-\d{2}_\d{1,2})#(\d+)\.json\.gz")
    parts: dict[str, int] = {}
    for path in directory.iterdir():
        if match := pattern.fullmatch(path.name):
            name = f"{prefix}_{match[1]}"
            parts[name] = max(parts.get(name, 0), int(match[2]) + 1)
    return parts


def _json_lines(table: pa.Table) -> pa.Array:
    """One newline-terminated JSON line per row, as ``json.dumps`` of ``_json_record`` would write it.

    Built with Arrow string kernels; the rare rows they cannot encode (control characters, which need escapes,
    null property values, years outside 1000-9999) are encoded by json.dumps instead.
    """
    table = table.combine_chunks()
    column = {name: table[name].chunk(0) for name in table.column_names}
    revenue = column["revenue"]
    revenue_text = pc.replace_with_mask(
        pa.nulls(len(revenue), pa.string()),
        revenue.is_valid(),
        pa.array([f',"revenue":{json.dumps(v)}' for v in revenue.drop_null().to_pylist()], pa.string()),
    )
    times, odd_years = _format_times(column["event_time"].cast(pa.int64()).to_numpy())
    lines = pc.binary_join_element_wise(
        '{"event_type":"', _escape(column["event_type"]),
        '","user_id":"', _escape(column["user_id"]),
        '","device_id":null,"event_time":"', times,
        '","event_properties":{', _json_members(column["event_properties"]),
        '},"user_properties":{', _json_members(column["user_properties"]),
        '},"insert_id":"', _escape(column["insert_id"]),
        '"', pc.fill_null(revenue_text, ""),
        "}\n",
        "",
    )
    offsets = _string_offsets(lines)
    control = np.flatnonzero(_string_bytes(lines) < 0x20) + offsets[0]
    row = np.searchsorted(offsets, control, side="right") - 1
    inside = control != offsets[row + 1] - 1  # every line ends with its own newline
    null = np.flatnonzero(lines.is_null().to_numpy(zero_copy_only=False))
    bad = np.union1d(np.union1d(row[inside], null), np.flatnonzero(odd_years))
    if len(bad):
        mask = np.zeros(len(lines), bool)
        mask[bad] = True
        fixed = [json.dumps(_json_record(r), separators=(",", ":"), ensure_ascii=False) + "\n"
                 for r in table.take(bad).to_pylist()]
        lines = pc.replace_with_mask(lines, pa.array(mask), pa.array(fixed, pa.string()))
    return lines


def _escape(strings: pa.Array) -> pa.Array:
    """Backslashes and quotes escaped for a JSON string; control characters are left to the caller."""
    return pc.replace_substring(pc.replace_substring(strings, "\\", "\\\\"), '"', '\\"')


def _json_members(maps: pa.MapArray) -> pa.Array:
    """The inside of a JSON object per string map; a null map gives an empty object, as Amplitude sends."""
    pairs = pc.binary_join_element_wise('"', _escape(maps.keys), '":"', _escape(maps.items), '"', "")
    members = pc.binary_join(pa.ListArray.from_arrays(maps.offsets, pairs), ",")
    return pc.if_else(maps.is_valid(), members, "") if maps.null_count else members


def _format_times(us: np.ndarray) -> tuple[pa.StringArray, np.ndarray]:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` of microseconds since the epoch, and where the year is not four digits.

    Arrow's strftime costs about a microsecond per value; digit arithmetic in numpy is an order of magnitude faster.
    """
    day = us.astype("datetime64[us]").astype("datetime64[D]")
    month = day.astype("datetime64[M]")
    year = month.astype("datetime64[Y]").astype(np.int64) + 1970
    within_day = us - day.astype(np.int64) * _DAY_US
    fields = (
        (year, 4, "-"),
        (month.astype(np.int64) % 12 + 1, 2, "-"),
        ((day - month.astype("datetime64[D]")).astype(np.int64) + 1, 2, " "),
        (within_day // _HOUR_US, 2, ":"),
        (within_day // 60_000_000 % 60, 2, ":"),
        (within_day // 1_000_000 % 60, 2, "."),
        (within_day % 1_000_000, 6, ""),
    )
    text = np.empty((len(us), 26), np.uint8)
    position = 0
    for value, width, separator in fields:
        for power in range(width - 1, -1, -1):
            text[:, position] = ord("0") + value // 10**power % 10
            position += 1
        if separator:
            text[:, position] = ord(separator)
            position += 1
    offsets = np.arange(0, 26 * (len(us) + 1), 26, dtype=np.int32)
    strings = pa.StringArray.from_buffers(len(us), pa.py_buffer(offsets), pa.py_buffer(text))
    return strings, (year < 1000) | (year > 9999)


def _string_offsets(strings: pa.Array) -> np.ndarray:
    width = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    return np.frombuffer(strings.buffers()[1], width)[strings.offset : strings.offset + len(strings) + 1]


def _string_bytes(strings: pa.Array) -> np.ndarray:
    """The concatenated UTF-8 bytes of ``strings``, without copying."""
    offsets = _string_offsets(strings)
    return np.frombuffer(strings.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]


def _json_record(row: dict) -> dict:
    record = {
        "event_type": row["event_type"],
        "user_id": row["user_id"],
        "device_id": None,
        "event_time": row["event_time"].strftime("%Y-%m-%d %H:%M:%S.%f"),
        "event_properties": dict(row["event_properties"] or ()),
        "user_properties": dict(row["user_properties"] or ()),
        "insert_id": row["insert_id"],
    }
    if row["revenue"] is not None:
        record["revenue"] = row["revenue"]
    return record


def _threads(threads: int | None) -> int:
    return threads or min(os.cpu_count() or 1, 4)


def _blocks(world: _World, threads: int | None, build: Callable[[_Events], _R]) -> Iterator[tuple[int, _R]]:
    """(end of the user range, ``build(block)``) per block in user order, computed ahead on a few threads."""
    n_users, threads = world.config.n_users, _threads(threads)

    def simulate(lo: int, hi: int) -> _R:
        return build(_simulate_block(world, lo, hi))

    with ThreadPoolExecutor(threads) as pool:
        running: deque[tuple[int, Future[_R]]] = deque()
        for lo in range(0, n_users, _BLOCK_USERS):
            hi = min(lo + _BLOCK_USERS, n_users)
            running.append((hi, pool.submit(simulate, lo, hi)))
            if len(running) > threads:
                hi, future = running.popleft()
                yield hi, future.result()
        for hi, future in running:
            yield hi, future.result()


def _time_order(events: _Events) -> np.ndarray:
    """The permutation that sorts events by (event_time, insert_id).

    Blocks are concatenated in (user, sequence) order, so a stable sort on time already orders almost every tie
    like insert_id does; only ties within one user could differ (``-10`` sorts before ``-9`` as text), and the few
    tied rows are re-sorted by a numeric key that reproduces the text order of the sequence number.
    """
    order = np.argsort(events.time, kind="stable")
    time = events.time[order]
    tied = np.flatnonzero(time[1:] == time[:-1])
    if len(tied):
        rows = np.union1d(tied, tied + 1)
        sub = order[rows]
        sequence = events.sequence[sub]
        digits = np.searchsorted(10 ** np.arange(1, 19), sequence, side="right") + 1
        text_order = sequence * 10 ** (18 - digits)  # the sequence left-aligned, as in a text comparison
        order[rows] = sub[np.lexsort((digits, text_order, events.user[sub], events.time[sub]))]
    return order


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else None


class _Vocabulary:
    """All property keys and values as two string arrays, so properties are built with vectorised ``take``."""

    def __init__(self) -> None:
        self.domains = {
            "page": PAGES,
            "category": CATEGORIES,
            "price_band": PRICE_BANDS,
            "item_id": tuple(f"item_{i:05d}" for i in range(_N_ITEMS)),
            "quantity": _QUANTITIES,
            "payment_method": _PAYMENT,
            "channel": _CHANNELS,
            "rating": _RATINGS,
            "campaign": _CAMPAIGNS,
            "setting": _SETTINGS,
            "topic": _TOPICS,
            "reason": _REASONS,
            "platform": PLATFORMS,
            "country": COUNTRIES,
            "plan": PLANS,
        }
        self.offset = {}
        values: list[str] = []
        for name, domain in self.domains.items():
            self.offset[name] = len(values)
            values.extend(domain)
        self.values = pa.array(values)
        self.key_names = (*self.domains, "from_plan", "to_plan")
        self.keys = pa.array(self.key_names)
        self.key = {name: code for code, name in enumerate(self.key_names)}


_VOCAB = _Vocabulary()
_VALUE_CODE = np.int16  # vocabulary values are codes of this type: compact, since generate_table holds all events
assert len(_VOCAB.values) <= np.iinfo(_VALUE_CODE).max


class _World:
    """Everything shared by all blocks of one config: time grid and item catalogue."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.end_us = (config.end - _EPOCH) // timedelta(microseconds=1)
        self.start_us = (config.start - _EPOCH) // timedelta(microseconds=1)
        # Days are UTC days so that local hour-of-day patterns land on the right clock hours.
        self.day0_us = self.start_us - self.start_us % _DAY_US
        self.n_days = -(-(self.end_us - self.day0_us) // _DAY_US)
        weekday = (self.day0_us // _DAY_US + 3 + np.arange(self.n_days)) % 7  # 1970-01-01 was a Thursday
        self.day_factor = np.where(weekday >= 5, 1.15, 0.94).astype(np.float32)
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1,)))
        category = np.arange(_N_ITEMS) % len(CATEGORIES)
        self.item_price = np.round(
            _CATEGORY_MEDIAN_PRICE[category] * rng.lognormal(0.0, 0.6, _N_ITEMS), 2
        )
        self.item_band = np.digitize(self.item_price, [25.0, 100.0])
        self.session_rate = config.events_per_user_per_week / 7 / _EVENTS_PER_SESSION


def _draw(rng: np.random.Generator, weights, n: int) -> np.ndarray:
    cum = np.cumsum(weights, dtype=np.float64)
    return np.minimum(np.searchsorted(cum / cum[-1], rng.random(n), side="right"), len(cum) - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _ar1(rng: np.random.Generator, n_days: int, n_users: int, rho: float, sd: float) -> np.ndarray:
    """Stationary AR(1) paths, shape (days, users)."""
    x = rng.standard_normal((n_days, n_users), dtype=np.float32) * np.float32(sd)
    step = np.float32(np.sqrt(1 - rho**2))
    for d in range(1, n_days):
        x[d] = rho * x[d - 1] + step * x[d]
    return x


def _memory_before(daily: np.ndarray, decay: float) -> np.ndarray:
    """Exponentially decaying sum over the days strictly before each day: no same-day feedback."""
    out = np.zeros_like(daily)
    for d in range(1, len(daily)):
        out[d] = decay * out[d - 1] + daily[d - 1]
    return out


def _local_times(rng, world: _World, day: np.ndarray, country: np.ndarray) -> np.ndarray:
    """A UTC microsecond time on ``day`` at a local hour drawn from the daily activity pattern."""
    local_hour = _draw(rng, _HOUR_W, len(day)) + rng.random(len(day))
    return world.day0_us + day * _DAY_US + ((local_hour - _COUNTRY_UTC_OFFSET_H[country]) * _HOUR_US).astype(np.int64)


def _simulate_block(world: _World, lo: int, hi: int) -> _Events:
    """Events of users ``lo..hi-1``, sorted by user then time."""
    rng = np.random.default_rng(np.random.SeedSequence(world.config.seed, spawn_key=(0, lo // _BLOCK_USERS)))
    n, n_days = hi - lo, world.n_days

    # Static user traits.
    activity = rng.lognormal(-(_ACTIVITY_SIGMA**2) / 2, _ACTIVITY_SIGMA, n)
    platform = _draw(rng, _PLATFORM_W, n)
    country = _draw(rng, _COUNTRY_W, n)
    plan = _draw(rng, _PLAN_W, n)
    favourite = 1 + _draw(rng, _NON_ELEC_W, n)
    p_elec = np.where(rng.random(n) < _ELEC_FAN_SHARE, _ELEC_FAN_P, _ELEC_OTHER_P)
    intent_mean = rng.normal(0.0, _INTENT_USER_SD, n).astype(np.float32)
    pre_existing = rng.random(n) < _PRE_EXISTING
    join_day = np.where(pre_existing, -1, rng.integers(0, n_days, n))

    # Churn: a geometric wait for the decay phase (light users and free plans churn sooner), then cancellation.
    # Pre-existing users' clock starts before the window so that some are already decaying at its start.
    hazard = np.minimum(_CHURN_HAZARD * activity**-0.3 * _PLAN_CHURN[plan], 0.05)
    decay_start = np.where(pre_existing, -14, join_day) + rng.geometric(hazard) - 1
    decay_days = rng.integers(*_DECAY_DAYS, n)
    cancel_day = decay_start + decay_days

    # A few users switch plan at a random time while active; properties and the pro effect follow the switch.
    first_day = np.maximum(join_day, 0)
    last_day = np.minimum(cancel_day, n_days)
    changes = (rng.random(n) < _PLAN_CHANGE_SHARE) & (last_day > first_day)
    new_plan = (plan + rng.integers(1, len(PLANS), n)) % len(PLANS)
    change_us = world.day0_us + (
        (first_day + rng.random(n) * (last_day - first_day)) * _DAY_US
    ).astype(np.int64)
    change_us = np.where(changes, change_us, _NEVER)

    # Daily sessions: activity x latent engagement x weekday, fading during decay, none outside [join, cancel).
    days = np.arange(n_days)[:, None]
    engagement = _ar1(rng, n_days, n, _ENGAGEMENT_RHO, _ENGAGEMENT_SD)
    intent = intent_mean + _ar1(rng, n_days, n, _INTENT_RHO, _INTENT_SD)
    fade = np.float32(_DECAY_PER_DAY) ** np.clip(days - decay_start, 0, None).astype(np.float32)
    alive = (days >= join_day) & (days < cancel_day)
    rate = (world.session_rate * activity).astype(np.float32) * world.day_factor[:, None]
    rate = rate * np.exp(engagement - np.float32(_ENGAGEMENT_SD**2 / 2)) * fade * alive
    sessions = rng.poisson(rate)
    joiners = np.flatnonzero(~pre_existing)
    sessions[join_day[joiners], joiners] = np.maximum(sessions[join_day[joiners], joiners], 1)  # first-seen day

    cell = np.repeat(np.arange(sessions.size), sessions.ravel())  # one entry per session: day * n + user
    s_day, s_user = np.divmod(cell, n)
    n_sessions = len(cell)
    s_time = _local_times(rng, world, s_day, country[s_user])
    s_pro = np.where(s_time >= change_us[s_user], new_plan[s_user], plan[s_user]) == _PRO

    # Session contents. Intent drives views, carts and checkouts; purchases then depend on the observable funnel.
    s_intent = intent[s_day, s_user]
    page_views = rng.poisson(_PAGE_VIEWS_PER_SESSION[platform[s_user]])
    searches = rng.poisson(0.4, n_sessions)
    views = rng.poisson(0.8 * np.exp(s_intent - (_INTENT_SD**2 + _INTENT_USER_SD**2) / 2))
    elec_views = rng.binomial(views, p_elec[s_user])
    carts = rng.binomial(views, _sigmoid(-1.6 + 0.8 * s_intent))
    removes = rng.binomial(carts, 0.15)
    checkout = (carts > 0) & (rng.random(n_sessions) < _sigmoid(-0.4 + 0.8 * s_intent + 0.6 * s_pro))
    daily_funnel = np.bincount(cell, weights=views + 2 * carts + 4 * checkout, minlength=sessions.size)
    daily_elec = np.bincount(cell, weights=elec_views, minlength=sessions.size)
    funnel = _memory_before(daily_funnel.reshape(n_days, n), _FUNNEL_MEMORY)[s_day, s_user]
    elec = _memory_before(daily_elec.reshape(n_days, n), _FUNNEL_MEMORY)[s_day, s_user]
    buy_logit = -2.6 + 0.9 * np.log1p(funnel) + 0.5 * np.log1p(elec) + 0.7 * s_pro + 2.2 * checkout
    purchases = rng.random(n_sessions) < _sigmoid(buy_logit)
    # A purchase always comes with a cart and a checkout in its session; the funnel memory above was built from the
    # counts before this step, which keeps purchases computable for all days at once (no feedback loop).
    carts = np.maximum(carts, purchases)
    checkout = checkout | purchases
    background = rng.poisson(_BACKGROUND_PER_SESSION, n_sessions)

    # Expand per-session counts to events, placed within the session in funnel order.
    slot_type = np.array(
        [_T["session_start"], _T["page_view"], _T["search"], _T["view_item"], _ELEC_VIEW, _T["add_to_cart"],
         _T["remove_from_cart"], _T["begin_checkout"], _T["purchase"], -1]
    )
    slot_start = np.array([0.0, 0.02, 0.02, 0.02, 0.02, 0.3, 0.3, 0.86, 0.93, 0.02])
    slot_span = np.array([0.0, 0.7, 0.7, 0.7, 0.7, 0.55, 0.55, 0.06, 0.07, 0.7])
    counts = np.stack(
        [np.ones(n_sessions, np.int64), page_views, searches, views - elec_views, elec_views, carts, removes,
         checkout, purchases, background],
        axis=1,
    )
    flat = np.repeat(np.arange(counts.size), counts.ravel())
    e_session, slot = np.divmod(flat, counts.shape[1])
    e_type = slot_type[slot]
    is_background = slot == len(slot_type) - 1
    e_type[is_background] = _BACKGROUND_TYPES[_draw(rng, _BACKGROUND_W, int(is_background.sum()))]
    duration = rng.exponential(45e6, n_sessions) * counts.sum(axis=1)  # ~45 s per event
    offset = duration[e_session] * (slot_start[slot] + slot_span[slot] * rng.random(len(flat)))
    e_time = s_time[e_session] + offset.astype(np.int64)
    e_user = s_user[e_session]

    # Decay-phase support tickets, denser towards the cancellation; then the cancellation itself.
    decaying = np.flatnonzero(decay_start < n_days)
    n_tickets = rng.poisson(_DECAY_TICKETS_PER_DAY * decay_days[decaying])
    t_user = np.repeat(decaying, n_tickets)
    t_day = decay_start[t_user] + (decay_days[t_user] * np.sqrt(rng.random(len(t_user)))).astype(np.int64)
    t_time = _local_times(rng, world, t_day, country[t_user])
    cancelling = np.flatnonzero(cancel_day < n_days)
    c_time = _local_times(rng, world, cancel_day[cancelling], country[cancelling])
    cancel_us = np.full(n, _NEVER)
    cancel_us[cancelling] = c_time
    changers = np.flatnonzero(changes)

    user = np.concatenate([e_user, t_user, cancelling, changers])
    time = np.concatenate([e_time, t_time, c_time, change_us[changers]])
    etype = np.concatenate([
        e_type,
        np.full(len(t_user), _T["support_ticket"]),
        np.full(len(cancelling), _T["subscription_cancelled"]),
        np.full(len(changers), _T["plan_changed"]),
    ])
    keep = (time >= world.start_us) & (time < world.end_us) & (time <= cancel_us[user])
    user, time, etype = user[keep], time[keep], etype[keep]
    order = np.lexsort((etype, time, user))
    user, time, etype = user[order], time[order], etype[order]

    current_plan = np.where(time >= change_us[user], new_plan[user], plan[user])
    users = _UserTraits(platform, country, plan, new_plan, favourite, p_elec)
    prop_keys, prop_values, revenue = _event_properties(rng, world, etype, user, users)
    first_code = _VOCAB.offset
    user_props = np.stack(
        [first_code["country"] + country[user], first_code["plan"] + current_plan,
         first_code["platform"] + platform[user]],
        axis=1,
    ).astype(_VALUE_CODE)
    per_user = np.bincount(user, minlength=n)
    sequence = np.arange(len(user)) - (np.cumsum(per_user) - per_user)[user]
    return _Events(
        (lo + user).astype(np.int32), etype.astype(np.int8), time, sequence.astype(np.int32), prop_keys, prop_values,
        user_props, revenue,
    )


@dataclass(frozen=True)
class _Events:
    """Events as numeric codes, one row per event; strings are only made by ``_to_table``."""

    user: np.ndarray  # global user index
    etype: np.ndarray  # index into _TYPE_NAMES
    time: np.ndarray  # microseconds since the epoch
    sequence: np.ndarray  # the event's number among its user's events, in time order
    prop_keys: np.ndarray  # (rows, _MAX_PROPERTIES) index into the vocabulary's keys, -1 where absent
    prop_values: np.ndarray  # same shape, index into the vocabulary's values
    user_props: np.ndarray  # (rows, 3) vocabulary values of country, plan, platform
    revenue: np.ndarray  # NaN where absent

    def take(self, index) -> _Events:
        return _Events(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        return _Events(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Events)))


_USER_PROPERTY_KEYS = np.array([_VOCAB.key[k] for k in ("country", "plan", "platform")])


def _to_table(events: _Events, world: _World) -> pa.Table:
    if not len(events.user):
        return EVENT_SCHEMA.empty_table()
    lo, hi = int(events.user.min()), int(events.user.max()) + 1
    width = max(6, len(str(max(world.config.n_users - 1, 0))))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(lo, hi)), pa.string()), width=width, padding="0")
    user_id = pc.binary_join_element_wise("u", digits, "").take(pa.array(events.user - lo))
    sequence = pc.cast(pa.array(events.sequence), pa.string())
    user_keys = np.broadcast_to(_USER_PROPERTY_KEYS, events.user_props.shape)
    return pa.Table.from_arrays(
        [
            user_id,
            _TYPE_NAMES.take(pa.array(events.etype)),
            pa.array(events.time, pa.timestamp("us", tz="UTC")),
            pc.binary_join_element_wise(str(world.config.seed), user_id, sequence, "-"),
            _map(events.prop_keys, events.prop_values),
            _map(user_keys, events.user_props),
            pa.array(events.revenue, pa.float64(), mask=np.isnan(events.revenue)),
        ],
        schema=EVENT_SCHEMA,
    )


@dataclass(frozen=True)
class _UserTraits:
    platform: np.ndarray
    country: np.ndarray
    plan: np.ndarray
    new_plan: np.ndarray
    favourite: np.ndarray
    p_elec: np.ndarray


_ITEM_TYPES = np.array(
    [_T[t] for t in ("view_item", "add_to_cart", "remove_from_cart", "purchase", "add_to_wishlist", "rate_item")]
    + [_ELEC_VIEW]
)
_MAX_PROPERTIES = 4


def _event_properties(rng, world: _World, etype: np.ndarray, user: np.ndarray, users: _UserTraits):
    """Key and value codes of event_properties, and revenue, drawn per event type.

    Keys go in name order within each map (as in user_properties), the canonical order ingestion writes, so
    events written directly equal events that went through an Amplitude export and back.
    """
    n = len(etype)
    keys = np.full((n, _MAX_PROPERTIES), -1, np.int8)
    values = np.zeros((n, _MAX_PROPERTIES), _VALUE_CODE)

    def put(rows, column, key, codes, domain=None):
        keys[rows, column] = _VOCAB.key[key]
        values[rows, column] = _VOCAB.offset[domain or key] + codes

    def category_for(rows, electronics):
        """Electronics per ``electronics``; otherwise mostly the user's favourite other category."""
        k, u = len(rows), user[rows]
        other = np.where(rng.random(k) < _FAVOURITE_SHARE, users.favourite[u], 1 + _draw(rng, _NON_ELEC_W, k))
        return np.where(electronics, 0, other)

    def of(name):
        return np.flatnonzero(etype == _T[name])

    rows = of("page_view")
    put(rows, 0, "page", _draw(rng, _PAGE_W, len(rows)))
    rows = of("search")
    put(rows, 0, "category", category_for(rows, rng.random(len(rows)) < users.p_elec[user[rows]]))

    rows = np.flatnonzero(np.isin(etype, _ITEM_TYPES))
    forced = etype[rows] == _ELEC_VIEW
    optional = etype[rows] != _T["view_item"]  # view_item of other categories is never electronics
    electronics = forced | (optional & (rng.random(len(rows)) < users.p_elec[user[rows]]))
    category = category_for(rows, electronics)
    popularity_rank = (_N_ITEMS // len(CATEGORIES) * rng.random(len(rows)) ** 3).astype(np.int64)
    item = popularity_rank * len(CATEGORIES) + category
    put(rows, 0, "category", category)
    put(rows, 1, "item_id", item)
    put(rows, 2, "price_band", world.item_band[item])
    rated = etype[rows] == _T["rate_item"]
    put(rows[rated], 3, "rating", _draw(rng, _RATING_W, int(rated.sum())))
    bought = etype[rows] == _T["purchase"]
    quantity = _draw(rng, _QUANTITY_W, int(bought.sum()))
    put(rows[bought], 3, "quantity", quantity)
    revenue = np.full(n, np.nan)
    revenue[rows[bought]] = np.round(world.item_price[item[bought]] * (quantity + 1), 2)

    for name, key, domain in (
        ("begin_checkout", "payment_method", _PAYMENT),
        ("share", "channel", _CHANNELS),
        ("invite_friend", "channel", _CHANNELS),
        ("open_notification", "campaign", _CAMPAIGNS),
        ("settings_change", "setting", _SETTINGS),
        ("support_ticket", "topic", _TOPICS),
        ("subscription_cancelled", "reason", _REASONS),
    ):
        rows = of(name)
        put(rows, 0, key, rng.integers(0, len(domain), len(rows)))
    rows = of("plan_changed")
    put(rows, 0, "from_plan", users.plan[user[rows]], "plan")
    put(rows, 1, "to_plan", users.new_plan[user[rows]], "plan")

    return keys, values, revenue


def _map(keys: np.ndarray, values: np.ndarray) -> pa.MapArray:
    """A map<string,string> array from per-row key and value codes; a negative key code means no entry."""
    present = keys >= 0
    offsets = np.zeros(len(keys) + 1, np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    return pa.MapArray.from_arrays(
        offsets, _VOCAB.keys.take(pa.array(keys[present])), _VOCAB.values.take(pa.array(values[present])),
        type=PROPERTY_MAP,
    )
