"""The code location loads as the webserver and `dg` load it."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

from automl_assets.definitions import defs

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
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dg"), "check", "defs"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
