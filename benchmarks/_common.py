"""Shared plumbing of the benchmark scripts: sizes, synthetic data, timing with progress lines, process-tree memory,
and the project's engines built the way its resources build them. Nothing here changes how the project computes
anything."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The end of the synthetic history (a midnight UTC). The generated data runs one hour past it: that last hour is held
# out as "the new hour" a refresh appends (P2), so the feature cutoff of P1 is END itself.
END = datetime(2026, 3, 2, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
WEEKS = 10
SEED = 7
EVENTS_PER_USER_PER_WEEK = 2.93  # measured: ~20 events per user over the 10 weeks at this rate

SIZES = {
    # name: (users, approximate events)
    "full": 1_000_000,  # ~20M events
    "small": 50_000,  # ~1M events
    "tiny": 5_000,  # ~0.1M events: a smoke test of the script itself
}


def add_size_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--small", action="store_const", dest="size", const="small", help="~1M events (50k users)")
    group.add_argument("--tiny", action="store_const", dest="size", const="tiny", help="~0.1M events (5k users): smoke test")
    group.add_argument("--users", type=int, help="number of simulated users (~20 events each); default 1,000,000 (~20M events)")
    parser.add_argument("--workdir", help="scratch folder (default: a new folder under /tmp, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (e.g. to pass it to P2 as --store)")
    add_spark_conf_option(parser)


def add_spark_conf_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spark-conf", action="append", default=[], metavar="KEY=VALUE",
        help="what-if: an extra Spark setting on top of the project's (e.g. spark.driver.maxResultSize=4g); "
        "results are then labelled as not the project's defaults",
    )


def apply_spark_conf(pairs: list[str]) -> str:
    """Extra Spark settings for a what-if run, applied at JVM launch (PYSPARK_SUBMIT_ARGS) so that they reach the
    session the project's own resources build; returns a label for the results ('' when none)."""
    if not pairs:
        return ""
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--spark-conf {pair!r}: write KEY=VALUE")
    os.environ["PYSPARK_SUBMIT_ARGS"] = " ".join(f"--conf {pair}" for pair in pairs) + " pyspark-shell"
    return "WHAT-IF Spark settings on top of the project's: " + ", ".join(pairs)


def users_for(args) -> int:
    if getattr(args, "users", None):
        return args.users
    return SIZES[args.size or "full"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Timings(dict):
    """name -> seconds, in the order measured."""

    memory: "TreeMemory | None" = None

    @contextmanager
    def step(self, name: str, what: str | None = None, heartbeat: float = 30.0):
        """Times the block; prints a line when it starts, every `heartbeat` seconds while it runs, and when it ends."""
        log(f"{name}: {what or 'started'} ...")
        if self.memory is not None:
            self.memory.current_step = name
        start = time.perf_counter()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(heartbeat):
                extra = f", process tree RSS {gib(self.memory.last)}" if self.memory is not None else ""
                log(f"{name}: still running, {time.perf_counter() - start:.0f} s so far{extra}")

        ticker = threading.Thread(target=beat, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            self[name] = time.perf_counter() - start
            log(f"{name}: {self[name]:.1f} s")


@contextmanager
def workdir(args, prefix: str):
    """The scratch folder under /tmp; removed at the end unless --keep or --workdir was given."""
    if args.workdir:
        path = Path(args.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        if args.keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def embedded_spark_only(scratch: Path) -> None:
    """Make sure the project's spark_resource() builds the embedded local[*] session (never a remote that another
    session started), and keep Spark's scratch files inside our folder."""
    for variable in ("AUTOML_SPARK_REMOTE", "AUTOML_SPARK_MASTER", "SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED"):
        os.environ.pop(variable, None)
    local = scratch / "spark-local"
    local.mkdir(parents=True, exist_ok=True)
    os.environ["SPARK_LOCAL_DIRS"] = str(local)


def config_for(users: int, end: datetime = END + HOUR):
    """The synthetic data of every benchmark; by default one hour past END: the held-out hour P2 appends."""
    from automl_assets.core.synthetic import SyntheticConfig

    return SyntheticConfig(n_users=users, end=end, weeks=WEEKS, seed=SEED, events_per_user_per_week=EVENTS_PER_USER_PER_WEEK)


def generate(users: int):
    """All synthetic events, split into the history (event_time < END) and the held-out new hour [END, END + 1h)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from automl_assets.core.synthetic import generate_table

    table = generate_table(config_for(users))  # sorted by event_time
    cut = int(pc.sum(pc.less(table["event_time"], pa.scalar(END, pa.timestamp("us", tz="UTC")))).as_py() or 0)
    return table.slice(0, cut), table.slice(cut)


def top_events(history, as_of: datetime, weeks: int, limit: int = 50) -> tuple[str, ...]:
    """The `limit` event types with most events in the lookback before `as_of` (ties by name), as the project's
    taxonomy ranks them; computed outside every timed step, and handed to both engines."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from automl_assets.core.feature_sql import usable_value

    start = pa.scalar(as_of - timedelta(weeks=weeks), pa.timestamp("us", tz="UTC"))
    window = history.filter(pc.greater_equal(history["event_time"], start))
    counts = pc.value_counts(window["event_type"]).to_pylist()
    ranked = sorted(((c["counts"], c["values"]) for c in counts if usable_value(c["values"])), key=lambda x: (-x[0], x[1]))
    return tuple(name for _, name in ranked[:limit])


# ---------------------------------------------------------------------------------------------------------------------
# Memory of the whole process tree, from /proc (psutil is not installed in the project's environment)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(pid: int) -> list[int]:
    children, out, todo = _children_map(), [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed RSS of this process and all its descendants (the Spark JVM, SageMaker job subprocesses)
    every `interval` seconds; `peak` is the highest sum seen, `peak_by_step` the highest within each named step."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.peak_detail: dict[str, int] = {}
        self.peak_by_step: dict[str, int] = {}
        self.current_step = "-"
        self.samples: list[tuple[float, int]] = []  # (epoch seconds, summed RSS), to attribute peaks to sub-steps
        self.peak_detail_by_step: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            detail: dict[str, int] = {}
            for pid in _tree(me):
                try:
                    with open(f"/proc/{pid}/comm") as handle:
                        name = "this process" if pid == me else f"child {handle.read().strip()}"
                except OSError:
                    continue
                detail[name] = detail.get(name, 0) + _rss_bytes(pid)
            total = sum(detail.values())
            self.last = total
            if total > self.peak:
                self.peak, self.peak_detail = total, detail
            step = self.current_step
            self.samples.append((time.time(), total))
            if total > self.peak_by_step.get(step, -1):
                self.peak_by_step[step] = total
                self.peak_detail_by_step[step] = detail
            self._stop.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for moment, rss in self.samples if start <= moment <= end), default=0)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class Machine:
    nproc: int
    memory_gib: float
    cpu: str
    load: str


def machine() -> Machine:
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        total_kib = int(handle.readline().split()[1])
    return Machine(os.cpu_count() or 0, total_kib / 2**20, cpu, " ".join(f"{x:.2f}" for x in os.getloadavg()))


def describe_machine() -> None:
    m = machine()
    log(f"machine: {m.nproc} CPUs ({m.cpu}), {m.memory_gib:.1f} GiB RAM, load average {m.load}; code: {code_state()}")


# ---------------------------------------------------------------------------------------------------------------------
# The project's SQL engines, built by its resources (resources/environments.py, resources/engine.py)


def engine_names() -> tuple[str, ...]:
    from resources.environments import ENGINES

    return ENGINES


def default_engine() -> str:
    """The engine the project picks with the current environment (AUTOML_ENGINE, AUTOML_SPARK_*)."""
    from resources.engine import SparkEngineResource
    from resources.environments import engine_resource

    return "spark" if isinstance(engine_resource(), SparkEngineResource) else "duckdb"


def make_engine(name: str):
    """The project's engine `name`, exactly as its resource builds it."""
    from resources.environments import engine_resource

    engine = engine_resource(name).engine()
    if name == "spark":
        engine.session.sql("SELECT 1").collect()  # the session is lazy: start it inside the timed step
    return engine


def stop_engine(engine) -> None:
    if engine.name == "spark":
        engine.session.stop()
    else:
        engine.con.close()


def code_state() -> str:
    """The commit the benchmark ran on and the files changed on top of it (other sessions edit the tree)."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    if not (ROOT / ".git").exists():
        return f"the files under {ROOT} (not a git checkout)"
    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if not line[3:].startswith("benchmarks/")]
    return f"commit {git('rev-parse', '--short', 'HEAD')}" + (f" + uncommitted changes in {len(dirty)} files" if dirty else "")
