"""The whole asset graph for one partition, through Dagster, on tiny synthetic data with a planted signal."""

import os
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from automl_assets.core import layout, quality
from automl_assets.core.calibration import Calibrator
from automl_assets.core.metrics import auc
from automl_assets.core.spec import parse_spec
from automl_assets.core.synthetic import SyntheticConfig, generate_events, write_amplitude_export
from automl_assets.core.timewin import HOUR, WEEK, hour_key
from automl_assets.definitions import ASSET_MODULES
from automl_assets.partitions import prediction_hour_key
from automl_assets.predictions import SCOPE_TAG, model_in_force, register_prediction
from automl_assets.runs import RANGE_END_TAG, RANGE_START_TAG
from automl_assets.scores import endpoint_name
from resources.environments import ENGINES, resources_for_env
from resources.sagemaker import HourlyEndpoint, LocalSageMaker
from resources.storage import LocalStorage
from tests.conftest import utc

END = utc(2026, 3, 2)  # the partition's as-of time: a midnight, so the daily run scores the whole cohort
HOUR_H = END - HOUR
WEEKS = 4
SPEC_FIELDS = {
    "name": "buy_7d",
    "outcome": {"event": "purchase"},
    "horizon": "7d",
    "cohort": {"active_within": "14d"},
    "lookback_weeks": 2,
}
SPEC = parse_spec(SPEC_FIELDS)
ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
EVENT_STORE = [a for a in ASSETS if a.key.path[0] in ("events", "hourly_rollups")]
PREDICTION_ASSETS = [a for a in ASSETS if a not in EVENT_STORE]


def resources(root: str, engine: str) -> dict:
    return {**resources_for_env("local", engine=engine), "storage": LocalStorage(root=root)}


def materialise_prediction(instance, root, engine):
    return dg.materialize(
        PREDICTION_ASSETS,
        instance=instance,
        resources=resources(root, engine),
        partition_key=prediction_hour_key(SPEC.name, HOUR_H),
    )


def read(storage, asset: str, *name: str) -> pd.DataFrame:
    return pd.read_parquet(storage.path(*layout.prediction_asset(SPEC.name, asset, HOUR_H, *name)))


@pytest.fixture(scope="module", params=ENGINES)
def graph(request, tmp_path_factory):
    """The whole graph on each engine (DuckDB embedded, Spark) from the same landed files."""
    engine = request.param
    root = str(tmp_path_factory.mktemp(f"graph-{engine}") / "store")
    storage = LocalStorage(root=root)
    for chunk in generate_events(SyntheticConfig(n_users=5000, end=END, weeks=WEEKS, seed=3)):
        write_amplitude_export(chunk, Path(storage.path(*layout.landing(), "synthetic")))
    with dg.instance_for_test() as instance:
        event_run = dg.materialize(
            EVENT_STORE,
            instance=instance,
            resources=resources(root, engine),
            tags={RANGE_START_TAG: hour_key(END - WEEKS * WEEK), RANGE_END_TAG: hour_key(HOUR_H)},
        )
        assert event_run.success
        register_prediction(instance, storage, SPEC)
        first = materialise_prediction(instance, root, engine)
        assert first.success
        yield instance, root, storage, engine


def test_event_store_run_covers_the_range_in_one_run(graph):
    instance, _, storage, _ = graph
    runs = instance.get_run_records()
    event_runs = [r for r in runs if r.dagster_run.tags.get(RANGE_START_TAG)]
    assert len(event_runs) == 1
    materialised = instance.get_materialized_partitions(dg.AssetKey("hourly_rollups"))
    assert len(materialised) == WEEKS * 7 * 24
    assert len(storage.list_dir("events")) > 0.9 * WEEKS * 7 * 24  # the synthetic users are active around the clock


def test_every_cohort_user_is_scored_exactly_once(graph):
    _, _, storage, _ = graph
    scores = read(storage, "scores", "scores.parquet")
    cohort = read(storage, "cohort", "infer")
    assert len(scores) == len(cohort) > 500
    assert scores["user_id"].is_unique
    assert set(scores["user_id"]) == set(cohort["user_id"])
    assert scores["score"].between(0, 1, inclusive="neither").all()
    assert scores["percentile"].between(0, 100).all()
    assert (scores["model_version"] == f"{SPEC.name}@2026-03-01T23").all()
    assert (scores["scored_at"] == pd.Timestamp(END)).all()
    latest = storage.read_table(*layout.latest_scores(SPEC.name)).to_pandas()
    published = scores.drop(columns="prediction").sort_values("user_id").reset_index(drop=True)
    assert latest.sort_values("user_id").reset_index(drop=True).equals(published)


def test_model_learns_the_planted_signal_and_calibration_helps(graph):
    _, _, storage, _ = graph
    calibration = storage.read_json(*layout.prediction_asset(SPEC.name, "calibrator", HOUR_H, "calibrator.json"))
    assert calibration["before"]["auc"] > 0.75, calibration["before"]
    print("calibration", calibration["before"], calibration["after"])
    assert calibration["after"]["ece"] < calibration["before"]["ece"], (calibration["before"], calibration["after"])
    held_out = read(storage, "model", "output", "validation_predictions.parquet")
    assert auc(held_out["label"], held_out["raw_score"]) > 0.7


def test_the_reliability_table_shows_the_cross_fitted_scores(graph):
    """The calibrator's reliability table is of the same out-of-fit scores as its `after` metrics: its deciles give
    back the recorded ECE (an in-sample table would look calibrated almost exactly)."""
    instance, _, storage, _ = graph
    calibration = storage.read_json(*layout.prediction_asset(SPEC.name, "calibrator", HOUR_H, "calibrator.json"))
    table = instance.get_latest_materialization_event(dg.AssetKey("calibrator")).asset_materialization.metadata["reliability"]
    rows = [line.split("|")[1:-1] for line in table.value.splitlines()[2:]]
    gaps = [abs(float(row[2]) - float(row[3])) for row in rows]  # calibrated mean against observed, per decile
    assert np.mean(gaps) == pytest.approx(calibration["after"]["ece"], abs=0.002)
    assert calibration["after"]["ece"] > 0.004  # far enough from an in-sample table's for the check to tell them apart


def test_training_matrix_has_labels_from_the_window_after_the_cutoff(graph):
    _, _, storage, _ = graph
    train = read(storage, "feature_matrix", "train", "matrix.parquet")
    snapshots = storage.read_json(*layout.prediction_asset(SPEC.name, "cohort", HOUR_H, "snapshots.json"))["count"]
    # 4 weeks of history: the newest snapshot (cutoff END - 1w) reads 2 weeks back, one more fits (END - 2w).
    assert snapshots == 2 and sorted(train["snapshot"].unique()) == [0, 1]
    for weeks_back, rows in train.groupby("snapshot"):
        labels = read(storage, "labels", "train", f"weeks_back={weeks_back}")
        positives = set(labels.loc[labels["outcome"] > 0, "user_id"])
        assert set(rows.loc[rows["label"] == 1, "user_id"]) == positives & set(rows["user_id"])
        assert rows["user_id"].is_unique
    assert not train.isna().any().any()
    assert 0.02 < train["label"].mean() < 0.6


def test_rerunning_the_partition_gives_identical_output(graph):
    """Re-running a trained partition gives the same files. Its hour is out of force while it retrains: a run that
    stopped after `model` must not leave the new model paired with the hour's old calibrator."""
    instance, root, storage, engine = graph
    before = {name: read(storage, *parts) for name, parts in OUTPUTS.items()}
    taxonomy_before = storage.read_json(*layout.prediction_asset(SPEC.name, "taxonomy", HOUR_H, "taxonomy.json"))

    def run(selected):
        assets = [a for a in PREDICTION_ASSETS if (a.key.path[0] in ("calibrator", "scores")) == selected]
        partition = prediction_hour_key(SPEC.name, HOUR_H)
        return dg.materialize(assets, instance=instance, resources=resources(root, engine), partition_key=partition)

    assert model_in_force(storage, SPEC.name, HOUR_H) == HOUR_H
    assert run(selected=False).success  # taxonomy ... model, then the run stops
    assert model_in_force(storage, SPEC.name, HOUR_H) is None
    assert run(selected=True).success  # calibrator, scores
    assert model_in_force(storage, SPEC.name, HOUR_H) == HOUR_H
    for name, parts in OUTPUTS.items():
        pd.testing.assert_frame_equal(read(storage, *parts), before[name], obj=name)
    assert storage.read_json(*layout.prediction_asset(SPEC.name, "taxonomy", HOUR_H, "taxonomy.json")) == taxonomy_before


OUTPUTS = {
    "train_matrix": ("feature_matrix", "train", "matrix.parquet"),
    "infer_matrix": ("feature_matrix", "infer", "matrix.parquet"),
    "scores": ("scores", "scores.parquet"),
}


def test_a_model_trained_on_another_taxonomy_scores_the_features_it_was_trained_on(graph):
    """When the hour's taxonomy differs from the model in force's (a retrain that was not promoted), scoring rebuilds
    the matrix with the model's taxonomy: here the model's own features, so the scores come out the same."""
    instance, root, storage, engine = graph
    before = read(storage, "scores", "scores.parquet")
    parts = layout.prediction_asset(SPEC.name, "taxonomy", HOUR_H, "taxonomy.json")
    stored = storage.read_json(*parts)
    storage.write_json({**stored, "taxonomy": {**stored["taxonomy"], "events": stored["taxonomy"]["events"][:-1]}}, *parts)
    try:
        scoring = dg.materialize(
            [a for a in PREDICTION_ASSETS if a.key.path[0] == "scores"],
            instance=instance,
            resources=resources(root, engine),
            partition_key=prediction_hour_key(SPEC.name, HOUR_H),
        )
        assert scoring.success
    finally:
        storage.write_json(stored, *parts)
    rebuilt = read(storage, "scores", "matrix")
    assert len(rebuilt) == len(read(storage, "feature_matrix", "infer", "matrix.parquet"))
    pd.testing.assert_frame_equal(read(storage, "scores", "scores.parquet"), before)


def test_the_promotion_gate_scores_the_model_in_force_again_on_the_new_held_out_users(graph, monkeypatch):
    """The gate does not take the number the model in force recorded on its own label window as the bar (here a
    lucky 0.01, which no model could beat): it scores that model again on the new model's held-out users, with the
    features of its own taxonomy. The model in force here is this hour's model copied to a day earlier, so the two
    must score alike, whether the retrain's taxonomy is the model in force's or not (its features are rebuilt)."""
    instance, root, storage, engine = graph
    earlier = HOUR_H - 24 * HOUR
    for asset in ("model", "calibrator"):
        shutil.copytree(storage.path(*layout.prediction_asset(SPEC.name, asset, HOUR_H)), storage.path(*layout.prediction_asset(SPEC.name, asset, earlier)))
    lucky = layout.prediction_asset(SPEC.name, "model", earlier, "promotion.json")
    storage.write_json({**storage.read_json(*lucky), "normalised_log_loss": 0.01}, *lucky)
    taxonomy_parts = layout.prediction_asset(SPEC.name, "taxonomy", HOUR_H, "taxonomy.json")
    taxonomy = storage.read_json(*taxonomy_parts)
    retrain = [a for a in PREDICTION_ASSETS if a.key.path[0] in ("model", "calibrator")]
    try:
        for hour_taxonomy in (taxonomy, {**taxonomy, "taxonomy": {**taxonomy["taxonomy"], "events": taxonomy["taxonomy"]["events"][:-1]}}):
            storage.write_json(hour_taxonomy, *taxonomy_parts)
            result = dg.materialize(retrain, instance=instance, resources=resources(root, engine), partition_key=prediction_hour_key(SPEC.name, HOUR_H))
            assert result.success
            decision = storage.read_json(*layout.prediction_asset(SPEC.name, "model", HOUR_H, "promotion.json"))
            assert decision["promoted"], decision["reason"]
            assert decision["compared_with"] == f"{SPEC.name}@2026-02-28T23"
            assert decision["in_force_normalised_log_loss"] == pytest.approx(decision["normalised_log_loss"], rel=1e-9)
            assert decision["in_force_auc"] == pytest.approx(decision["auc"], rel=1e-9)
            assert decision["compared_on_users"] == len(read(storage, "model", "output", "validation_predictions.parquet"))
            assert not storage.exists(*layout.prediction_asset(SPEC.name, "model", HOUR_H, "gate_matrix"))
        # A new model clearly worse than the model in force (here: the margin asks for one half as lossy) is not
        # promoted, and the model in force goes on scoring the hour.
        with monkeypatch.context() as patch:
            patch.setattr(quality, "PROMOTION_MARGIN", -0.5)
            result = dg.materialize(retrain, instance=instance, resources=resources(root, engine), partition_key=prediction_hour_key(SPEC.name, HOUR_H))
        assert result.success
        decision = storage.read_json(*layout.prediction_asset(SPEC.name, "model", HOUR_H, "promotion.json"))
        assert not decision["promoted"] and "more than" in decision["reason"], decision
        assert model_in_force(storage, SPEC.name, HOUR_H) == earlier
        # A model in force that cannot be loaded any more does not stop the retrain that replaces it.
        storage.remove(*layout.prediction_asset(SPEC.name, "model", earlier, "model"))
        result = dg.materialize(retrain, instance=instance, resources=resources(root, engine), partition_key=prediction_hour_key(SPEC.name, HOUR_H))
        assert result.success
        decision = storage.read_json(*layout.prediction_asset(SPEC.name, "model", HOUR_H, "promotion.json"))
        assert decision["promoted"] and "could not be scored again" in decision["reason"], decision
    finally:
        storage.write_json(taxonomy, *taxonomy_parts)
        storage.write_json(taxonomy, *layout.prediction_asset(SPEC.name, "model", HOUR_H, "taxonomy.json"))
        for asset in ("model", "calibrator"):
            storage.remove(*layout.prediction_asset(SPEC.name, asset, earlier))
    assert model_in_force(storage, SPEC.name, HOUR_H) == HOUR_H


def test_a_scoring_run_reads_the_lookback_of_the_model_in_force(graph):
    """A spec re-registered with a shorter lookback: until a retrain, scoring runs build the model's features over
    the model's weeks, so the inference matrix is the one the model was trained to read."""
    instance, root, storage, engine = graph
    before = read(storage, "feature_matrix", "infer", "matrix.parquet")
    register_prediction(instance, storage, parse_spec({**SPEC_FIELDS, "lookback_weeks": 1}))
    try:
        scoring = dg.materialize(
            [a for a in PREDICTION_ASSETS if a.key.path[0] in ("taxonomy", "cohort", "feature_aggregates", "feature_matrix")],
            instance=instance,
            resources=resources(root, engine),
            partition_key=prediction_hour_key(SPEC.name, HOUR_H),
        )
        assert scoring.success
    finally:
        register_prediction(instance, storage, SPEC)
    after = read(storage, "feature_matrix", "infer", "matrix.parquet")
    assert (before["f__all__w2"] > 0).any()  # the second week is read
    pd.testing.assert_frame_equal(after, before)


def test_hourly_scores_through_a_warm_endpoint_equal_the_batch_transform(graph, tmp_path, monkeypatch):
    """By default only runs a sensor or schedule launches (the hourly chain) keep an endpoint warm, serving the
    prediction's newest model; a run started by hand is a batch transform and leaves no process behind."""
    instance, root, storage, engine = graph
    scores_asset = [a for a in PREDICTION_ASSETS if a.key.path[0] == "scores"]

    def score_hour(scope: str, launched_by_sensor: bool, **sagemaker_options) -> tuple[str, pd.DataFrame]:
        result = dg.materialize(
            scores_asset,
            instance=instance,
            resources={**resources(root, engine), "sagemaker": LocalSageMaker(work_root=str(tmp_path), **sagemaker_options)},
            partition_key=prediction_hour_key(SPEC.name, HOUR_H),
            tags={SCOPE_TAG: scope, **({"dagster/sensor_name": "score_after_ingest"} if launched_by_sensor else {})},
        )
        assert result.success
        return result.asset_materializations_for_node("scores")[0].metadata["scored_by"].value, read(storage, "scores", "scores.parquet")

    name = endpoint_name(SPEC.name)
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    try:
        scored_by, batch = score_hour("active", launched_by_sensor=False)
        assert scored_by == "batch transform"
        assert score_hour("active", True, hourly_endpoint=HourlyEndpoint.NEVER)[0] == "batch transform"
        assert sagemaker.describe_endpoint(name) is None
        scored_by, warm = score_hour("active", launched_by_sensor=True)
        endpoint = sagemaker.describe_endpoint(name)
        assert scored_by == f"endpoint {name}" and endpoint is not None
        assert score_hour("active", False, hourly_endpoint=HourlyEndpoint.ALWAYS)[1].equals(warm)
        assert sagemaker.describe_endpoint(name) == endpoint  # the second hour used the warm process
        assert score_hour("cohort", launched_by_sensor=True)[0] == "batch transform"  # daily runs stay batch transforms
        # Once a newer model is in force, rescoring this hour (late events) with its own older model is a batch
        # transform: the endpoint keeps serving the newest model to the hourly runs calling it.
        newer = HOUR_H + HOUR
        for asset in ("model", "calibrator"):
            shutil.copytree(storage.path(*layout.prediction_asset(SPEC.name, asset, HOUR_H)), storage.path(*layout.prediction_asset(SPEC.name, asset, newer)))
        try:
            assert score_hour("active", launched_by_sensor=True)[0] == "batch transform"
        finally:
            for asset in ("model", "calibrator"):
                storage.remove(*layout.prediction_asset(SPEC.name, asset, newer))
        assert sagemaker.describe_endpoint(name) == endpoint
        # A retrain promoted while an hourly run is about to call the endpoint replaces it under that run: the run
        # scores its hour by a batch transform with its own model instead of failing.
        deploy = LocalSageMaker.deploy

        def replaced_right_after_deploy(self, *args, **kwargs):
            deployed = deploy(self, *args, **kwargs)
            self.delete_endpoint(deployed.name)
            return deployed

        with monkeypatch.context() as patch:
            patch.setattr(LocalSageMaker, "deploy", replaced_right_after_deploy)
            scored_by, fallback = score_hour("active", launched_by_sensor=True)
        assert scored_by == f"batch transform (endpoint {name} unavailable)" and fallback.equals(batch)
        # So does one whose endpoint does not come up in time, and the process that was starting is stopped.
        spawned, spawn = [], os.posix_spawn
        with monkeypatch.context() as patch:
            patch.setattr("resources.sagemaker.DEPLOY_TIMEOUT_SECONDS", 0)
            patch.setattr(os, "posix_spawn", lambda *args, **kwargs: spawned.append(spawn(*args, **kwargs)) or spawned[-1])
            scored_by, fallback = score_hour("active", launched_by_sensor=True)
        assert scored_by == f"batch transform (endpoint {name} unavailable)" and fallback.equals(batch)
        assert len(spawned) == 1
        with pytest.raises(ProcessLookupError):
            os.kill(spawned[0], 0)
    finally:
        stopped = sagemaker.delete_endpoint(name)
    assert not stopped  # none is left: the last one was stopped under its run, and the next never came up
    assert 0 < len(warm) < len(read(storage, "cohort", "infer"))
    pd.testing.assert_frame_equal(warm, batch, rtol=1e-5)  # float32 networks on other batch shapes


def test_scores_that_fail_their_check_are_not_published(graph, monkeypatch):
    """A score out of (0, 1) (here NaN, as for a user missing from the transform's output) fails the blocking check,
    and the latest-score table users read keeps every previous score."""
    instance, root, storage, engine = graph
    scores_asset = [a for a in PREDICTION_ASSETS if a.key.path[0] == "scores"]
    latest_before = storage.read_table(*layout.latest_scores(SPEC.name)).to_pandas()
    predict = Calibrator.predict
    monkeypatch.setattr(Calibrator, "predict", lambda self, raw: np.where(np.arange(len(raw)) == 0, np.nan, predict(self, raw)))

    def score(partition_hour):
        return dg.materialize(
            scores_asset, instance=instance, resources=resources(root, engine), raise_on_error=False,
            partition_key=prediction_hour_key(SPEC.name, partition_hour),
        )

    failed = score(HOUR_H)
    assert not failed.success
    (evaluation,) = [e.event_specific_data for e in failed.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert not evaluation.passed and "1 scores are not strictly between 0 and 1" in evaluation.description
    pd.testing.assert_frame_equal(storage.read_table(*layout.latest_scores(SPEC.name)).to_pandas(), latest_before)

    # `scores` alone for an hour whose upstream assets never ran says what to materialise.
    unmaterialised = score(HOUR_H - HOUR)
    (failure,) = [e for e in unmaterialised.all_events if e.is_step_failure]
    assert "taxonomy and cohort and feature_matrix of buy_7d at 2026-03-01T22:00:00+00:00 are not materialised" in (
        failure.step_failure_data.user_failure_data.description
    )
    monkeypatch.undo()
    assert score(HOUR_H).success  # the partition as the other tests left it
