"""The code location loads as the webserver and `dg` load it."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from automl_assets.definitions import defs

ROOT = Path(__file__).resolve().parent.parent
CARD_ASSETS = {"taxonomy", "feature_aggregates", "labels", "cohort", "feature_matrix", "model", "calibrator", "scores"}


def test_graph_has_the_card_assets_and_the_event_store():
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == CARD_ASSETS | {"events", "hourly_rollups"}


def test_lineage_runs_from_events_to_scores():
    graph = defs.resolve_asset_graph()
    upstream = graph.get(dg.AssetKey("scores")).parent_keys
    assert {dg.AssetKey("calibrator"), dg.AssetKey("feature_matrix")} <= set(upstream)
    assert dg.AssetKey("hourly_rollups") in graph.get(dg.AssetKey("taxonomy")).parent_keys
    assert dg.AssetKey("events") in graph.get(dg.AssetKey("labels")).parent_keys


def test_prediction_assets_are_partitioned_by_prediction_and_hour():
    graph = defs.resolve_asset_graph()
    for name in CARD_ASSETS:
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(partitions, dg.MultiPartitionsDefinition)
        assert {d.name for d in partitions.partitions_defs} == {"hour", "prediction"}


def test_jobs_resolve():
    assert defs.resolve_job_def("prediction_job")
    assert defs.resolve_job_def("event_store_job")


def test_dg_check_defs_accepts_the_project():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dg"), "check", "defs"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


EMBEDDED_SPARK_SOCKETS = r"""
import os, re
from pathlib import Path
from resources.engine import SparkEngineResource
from resources.spark import spark_config

spark = SparkEngineResource(spark_config=spark_config()).spark_session
spark.range(10).count()  # the driver and block manager are up


def parent_of(process):
    try:
        return (process / "stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:  # a process of another test that ended meanwhile
        return None


def link(fd):
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile
        return ""


jvms = [p for p in Path("/proc").iterdir() if p.name.isdigit() and parent_of(p) == str(os.getpid())]
inodes = {m.group(1) for jvm in jvms for fd in (jvm / "fd").iterdir() if (m := re.fullmatch(r"socket:\[(\d+)\]", link(fd)))}
for table in ("tcp", "tcp6"):
    for line in Path("/proc/net", table).read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # listening
            print(table, fields[1].split(":")[0])
spark.stop()
"""
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def test_embedded_spark_listens_on_loopback_only():
    """Every socket the embedded Spark JVM listens on is bound to 127.0.0.1 (the driver's RPC and block manager
    picked a network interface's address before)."""
    # Not in Spark Connect mode, which pyspark records in the environment once this process has a Connect session.
    env = {key: value for key, value in os.environ.items() if key not in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE")}
    child = subprocess.run([sys.executable, "-c", EMBEDDED_SPARK_SOCKETS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    out = child.stdout
    listening = [line.split() for line in out.splitlines()]
    assert len(listening) >= 2, out  # py4j's gateway, the driver, the block manager
    assert {address for _, address in listening} <= LOOPBACK, listening
