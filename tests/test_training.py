import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.special import expit

from automl_assets.core import sagemaker_entry, training
from automl_assets.core.calibration import to_prior
from automl_assets.core.matrices import feature_array
from automl_assets.core.metrics import summarise
from automl_assets.core.splits import split_users, user_fraction
from automl_assets.core.tfrecord import import_tensorflow, tfrecord_dataset, write_tfrecord
from resources.sagemaker import Endpoint, EndpointUnavailable, HourlyEndpoint, LocalSageMaker
from automl_assets.core.training import (
    ENSEMBLE,
    META_FILE,
    load_model,
    save_model,
    signed_log1p,
    train_candidates,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FAST_MODELS = ("logistic_regression", "hist_gradient_boosting")
PAIRS = ("logistic_regression+hist_gradient_boosting", "logistic_regression+keras_mlp", "hist_gradient_boosting+keras_mlp")


def planted_matrix(n_users: int = 3000, n_features: int = 12, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Counts per event and week; the label depends on the first three features."""
    rng = np.random.default_rng(seed)
    columns = [f"f__event{i}__w{i % 8 + 1}" for i in range(n_features)]
    X = rng.poisson(1.0, size=(n_users, n_features)).astype(float)
    signal = 2.5 * np.log1p(X[:, 0]) - 2 * np.log1p(X[:, 1]) + 1.2 * (X[:, 2] > 1) - 2.5  # Bayes AUC about 0.84
    matrix = pd.DataFrame(X, columns=columns)
    matrix.insert(0, "user_id", [f"user-{seed}-{i}" for i in range(n_users)])
    matrix["label"] = (rng.random(n_users) < expit(signal)).astype(np.int64)
    return matrix, columns


def split_of(matrix: pd.DataFrame, **overrides):
    options = {"validation_fraction": 0.2, "max_training_users": 5_000_000, "seed": 0} | overrides
    return split_users(matrix["user_id"], **options)


# --- split and cap ---------------------------------------------------------------------------------------------------


def test_split_is_by_user_independent_of_row_order_and_pinned():
    users = pd.Series([f"user-{i}" for i in range(4000)] * 2)  # two rows per user
    train, validation = split_users(users, validation_fraction=0.2, max_training_users=10**9, seed=0)
    assert (train ^ validation).all()
    assert set(users[train]).isdisjoint(users[validation])
    assert 0.18 < validation.mean() < 0.22
    shuffled = users.sample(frac=1, random_state=1)
    _, shuffled_validation = split_users(shuffled, validation_fraction=0.2, max_training_users=10**9, seed=0)
    assert set(shuffled[shuffled_validation]) == set(users[validation])
    # a keyed blake2b, not hash(): the same users on every machine and in every Python process
    first = users[:20]
    assert first[validation[:20]].tolist() == ["user-5", "user-7", "user-9", "user-11", "user-16", "user-18"]
    _, other_seed = split_users(users, validation_fraction=0.2, max_training_users=10**9, seed=1)
    assert set(users[other_seed]) != set(users[validation])


def test_cap_keeps_the_lowest_hashed_users_of_each_side_in_proportion():
    users = pd.Series([f"user-{i}" for i in range(3000)])
    uncapped_train, uncapped_validation = split_users(users, validation_fraction=0.2, max_training_users=10**9, seed=0)
    train, validation = split_users(users, validation_fraction=0.2, max_training_users=1000, seed=0)
    assert (train | validation).sum() == 1000
    assert 0.16 < validation.sum() / 1000 < 0.24
    # nobody changes sides because of the cap
    assert not (train & uncapped_validation).any() and not (validation & uncapped_train).any()
    # the kept users are the lowest of their side by the stable user fraction
    fraction = user_fraction(users, 0)
    rank_in_side = np.where(uncapped_validation, fraction / 0.2, (fraction - 0.2) / 0.8)
    kept = train | validation
    assert rank_in_side[kept].max() < rank_in_side[~kept].min()
    # a higher cap only adds users; row order does not matter
    more_train, more_validation = split_users(users, validation_fraction=0.2, max_training_users=2000, seed=0)
    assert not (kept & ~(more_train | more_validation)).any()
    reversed_train, _ = split_users(users[::-1], validation_fraction=0.2, max_training_users=1000, seed=0)
    assert set(users[::-1][reversed_train]) == set(users[train])


def test_a_training_cohort_over_the_cap_keeps_the_users_training_would_keep(tmp_path):
    import pyarrow as pa

    from automl_assets.cohort import sample_training_users
    from automl_assets.core.splits import SPLIT_SEED, VALIDATION_FRACTION
    from resources.storage import LocalStorage

    storage = LocalStorage(root=str(tmp_path))
    users = pd.Series([f"user-{i}" for i in range(3000)])
    storage.write_table(pa.table({"user_id": users, "active_last_hour": np.zeros(3000, dtype=np.int32)}), "cohort", "part-0.parquet")
    assert sample_training_users(storage, ("cohort",), 1000) == 1000
    kept = pd.read_parquet(storage.path("cohort"))["user_id"]
    options = {"validation_fraction": VALIDATION_FRACTION, "max_training_users": 1000, "seed": SPLIT_SEED}
    train, validation = split_users(users, **options)
    assert set(kept) == set(users[train | validation])
    # training on the sample keeps all of it, on the same sides
    sample_train, sample_validation = split_users(kept, **options)
    assert (sample_train | sample_validation).all() and set(kept[sample_validation]) == set(users[validation])


def test_the_cap_applies_to_each_stacked_snapshot_as_the_cohort_samples_them():
    # Two snapshots of 190 users each, 290 users in all: under a cap of 250 the cohort samples neither, so training
    # must keep every row (a cap on the users of all snapshots together dropped 40 users' rows that were built).
    users = pd.Series([f"u{i}" for i in range(190)] + [f"u{i}" for i in range(100, 290)])
    snapshots = np.repeat([0, 1], 190)
    options = {"validation_fraction": 0.2, "max_training_users": 250, "seed": 0}
    train, validation = split_users(users, **options, snapshots=snapshots)
    assert (train | validation).all()
    # Over the cap, each snapshot keeps the users the cohort's sample of it holds, on the same sides.
    options["max_training_users"] = 100
    train, validation = split_users(users, **options, snapshots=snapshots)
    for snapshot in (0, 1):
        rows = snapshots == snapshot
        alone = split_users(users[rows].reset_index(drop=True), **options)
        assert (train[rows] == alone[0]).all() and (validation[rows] == alone[1]).all()
        assert (train | validation)[rows].sum() == 100


def test_to_prior_undoes_balanced_class_weights():
    assert to_prior(np.array([0.5]), 0.1)[0] == pytest.approx(0.1)
    balanced = np.array([0.0, 0.2, 0.9, 1.0])
    np.testing.assert_allclose(to_prior(balanced, 0.5), balanced)
    odds = lambda p: p / (1 - p)  # noqa: E731
    assert odds(to_prior(np.array([0.8]), 0.2))[0] == pytest.approx(odds(0.8) * odds(0.2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_signed_log1p_in_numpy_is_its_formula_and_leaves_the_input_alone(dtype):
    x = np.array([[-1e6, -3, -1, 0], [1, 2, 7, 1e6]]).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        x[0, 0] = np.nan
    before = x.copy()
    np.testing.assert_array_equal(signed_log1p(x), np.sign(x) * np.log1p(np.abs(x)))
    np.testing.assert_array_equal(signed_log1p(pd.DataFrame(x)), signed_log1p(x))  # the evaluation's RFM pipeline
    assert signed_log1p(x).dtype == np.result_type(x, np.float32)
    np.testing.assert_array_equal(x, before)


def test_feature_array_reads_frames_tables_and_batches_alike():
    frame = pd.DataFrame(
        {"user_id": ["a", "b", "c"], "x": [1.5, None, -2.0], "n": pd.array([1, None, 3], dtype="Int64"), "k": [4, 5, 6]}
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1)])  # columns of two chunks, one at an offset
    expected = np.array([[4, 1.5, 1], [5, np.nan, np.nan], [6, -2, 3]], dtype=np.float32)
    for data in (frame, table, chunked, table.to_batches()[0]):
        X = feature_array(data, ["k", "x", "n"])
        assert X.dtype == np.float32 and X.shape == (3, 3)
        np.testing.assert_array_equal(X, expected)
        with pytest.raises(KeyError):
            feature_array(data, ["x", "missing"])


def test_weighted_bin_edges_in_one_call_are_scikit_learns(monkeypatch):
    import sklearn
    from sklearn.ensemble._hist_gradient_boosting import binning

    rng = np.random.default_rng(3)
    n = 5000
    weights = np.where(rng.random(n) < 0.1, 4.5, 0.55)  # class weights of a rare positive class
    columns = {
        "continuous": rng.lognormal(1, 2, n),
        "ties": np.round(rng.lognormal(1, 1, n), 1),
        "counts": rng.poisson(3.0, n).astype(float),  # fewer distinct values than bins
        "constant": np.zeros(n),
        "missing": np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n)),
    }
    zero_weighted = weights.copy()
    zero_weighted[rng.random(n) < 0.2] = 0
    for name, values in columns.items():
        for sample_weight in (None, weights, zero_weighted):
            expected = binning._find_binning_thresholds(values, 255, sample_weight=sample_weight)
            got = training._binning_thresholds(binning._find_binning_thresholds, values, 255, sample_weight=sample_weight)
            np.testing.assert_array_equal(got, expected, err_msg=name)

    X = np.column_stack(list(columns.values()))
    y = (rng.random(n) < 0.1 + 0.2 * (X[:, 0] > 3)).astype(int)
    data = training._TrainingData(X, y, None, None, np.arange(n).astype(str), None, 0)
    fitted = training._fit_hist_gradient_boosting(data)
    assert binning._find_binning_thresholds.__module__ == binning.__name__  # put back after the fit
    assert sklearn.__version__.startswith(("1.8.", "1.9.")), "a scikit-learn with PR 34248: drop _binning_thresholds"
    monkeypatch.setattr(training, "_weighted_edges_in_one_call", contextlib.nullcontext)
    reference = training._fit_hist_gradient_boosting(data)  # scikit-learn alone
    for edges, reference_edges in zip(fitted._bin_mapper.bin_thresholds_, reference._bin_mapper.bin_thresholds_):
        np.testing.assert_array_equal(edges, reference_edges)
    np.testing.assert_array_equal(fitted.predict_proba(X), reference.predict_proba(X))


def test_gradient_boosting_stops_early_on_whole_users(monkeypatch):
    """Like the network: the rows it stops on are all the stacked snapshots of some training users, weighted by
    class as its fitted rows are, so no user is on both sides."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(5)
    users = np.repeat([f"u{i}" for i in range(400)], 4)  # four stacked snapshots per user
    X = rng.normal(size=(len(users), 3))
    y = (rng.random(len(users)) < 0.3).astype(int)
    seen = {}
    fit = HistGradientBoostingClassifier.fit

    def spy(self, X_fit, y_fit, sample_weight=None, **held_out):
        seen.update(X_fit=X_fit, **held_out)
        return fit(self, X_fit, y_fit, sample_weight, **held_out)

    monkeypatch.setattr(HistGradientBoostingClassifier, "fit", spy)
    training._fit_hist_gradient_boosting(training._TrainingData(X, y, None, None, users, None, 0))
    held_out = np.isin(X[:, 0], seen["X_val"][:, 0])
    assert 0 < held_out.sum() < len(X) and len(seen["X_fit"]) == (~held_out).sum()
    assert not set(users[held_out]) & set(users[~held_out])
    weights = seen["sample_weight_val"]
    assert weights[seen["y_val"] == 1][0] / weights[seen["y_val"] == 0][0] == pytest.approx(
        (y[~held_out] == 0).sum() / (y[~held_out] == 1).sum()
    )


# --- training with scikit-learn candidates ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    matrix, columns = planted_matrix()
    return matrix, columns, train_candidates(matrix, columns, models=FAST_MODELS)


def test_chooses_the_lowest_validation_log_loss(planted):
    matrix, columns, outcome = planted
    assert set(outcome.metrics) == {*FAST_MODELS, ENSEMBLE}
    assert outcome.chosen == min(outcome.metrics, key=lambda name: outcome.metrics[name]["log_loss"])
    for metrics in outcome.metrics.values():
        assert set(metrics) == {"auc", "log_loss", "brier", "ece", "positives", "n"}
        assert metrics["auc"] > 0.75
        assert metrics["n"] == outcome.n_validation


def test_counts_and_validation_predictions_follow_the_user_split(planted):
    matrix, columns, outcome = planted
    train, validation = split_of(matrix)
    assert (outcome.n_train, outcome.n_validation, outcome.n_calibration) == (train.sum(), validation.sum(), validation.sum())
    assert outcome.n_train + outcome.n_validation == len(matrix)
    assert outcome.positives == matrix["label"][train].sum()
    predictions = outcome.validation_predictions
    assert list(predictions.columns) == ["user_id", "raw_score", "label"]
    assert predictions["user_id"].tolist() == matrix["user_id"][validation].tolist()
    assert predictions["label"].tolist() == matrix["label"][validation].tolist()
    np.testing.assert_allclose(
        predictions["raw_score"], outcome.models[outcome.chosen].predict(matrix[validation]), rtol=1e-12
    )


def test_stacked_snapshots_train_on_every_snapshot_choose_on_every_snapshot_and_calibrate_on_the_newest():
    newest, columns = planted_matrix(n_users=1500, seed=0)
    older = newest.copy()  # the same users one week earlier, with other features and outcomes
    older[columns] = older[columns] * 2 + 1
    older["label"] = 1 - older["label"]
    matrix = pd.concat([newest.assign(snapshot=0), older.assign(snapshot=1)], ignore_index=True)
    outcome = train_candidates(matrix, columns, models=FAST_MODELS)
    train, validation = split_of(matrix)
    assert outcome.n_train == train.sum() and outcome.positives == matrix["label"][train].sum()
    # The candidates are compared on both snapshots of the validation users ...
    assert outcome.n_validation == validation.sum() == 2 * (validation & (matrix["snapshot"] == 0)).sum()
    for metrics in outcome.metrics.values():
        assert (metrics["n"], metrics["positives"]) == (validation.sum(), matrix["label"][validation].sum())
    # ... and the calibrator, like the promotion gate, gets the chosen model's scores of their newest snapshot.
    held_out, newest_validation = outcome.validation_predictions, newest[validation[: len(newest)]]
    assert outcome.n_calibration == len(held_out) == len(newest_validation) == validation.sum() // 2
    assert held_out["user_id"].tolist() == newest_validation["user_id"].tolist()
    assert held_out["label"].tolist() == newest_validation["label"].tolist()
    chosen = outcome.models[outcome.chosen]
    np.testing.assert_allclose(held_out["raw_score"], chosen.predict(newest_validation), rtol=1e-12)
    assert outcome.chosen_newest == summarise(
        newest_validation["label"].to_numpy(), to_prior(chosen.predict(newest_validation), chosen.train_positive_rate)
    )
    assert outcome.summary()["chosen_newest_snapshot"] == outcome.chosen_newest


def test_the_newest_snapshot_of_the_validation_users_needs_both_classes():
    newest, columns = planted_matrix(n_users=1500, seed=0)
    older = newest.assign(label=np.arange(len(newest)) % 2)
    matrix = pd.concat([newest.assign(snapshot=0, label=1), older.assign(snapshot=1)], ignore_index=True)
    with pytest.raises(ValueError, match="the validation users' newest snapshot has .* positives"):
        train_candidates(matrix, columns, models=("logistic_regression",))


def test_candidates_are_compared_at_the_true_prior(planted):
    matrix, columns, outcome = planted
    rate = matrix["label"].mean()
    assert rate < 0.35
    for name, scoring in outcome.models.items():
        raw = scoring.predict(matrix)
        # Raw scores stay class-balanced (the calibrator maps them to probabilities) ...
        assert raw.mean() > rate + 0.1
        # ... while selection measures them at the training prior.
        validation = matrix["user_id"].isin(outcome.validation_predictions["user_id"])
        corrected = to_prior(scoring.predict(matrix[validation]), scoring.train_positive_rate)
        assert abs(corrected.mean() - rate) < 0.05, name


def test_save_and_load_round_trip(planted, tmp_path):
    matrix, columns, outcome = planted
    save_model(outcome, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["members"] == (list(FAST_MODELS) if outcome.chosen == ENSEMBLE else [outcome.chosen])
    assert all((tmp_path / f"{name}.joblib").exists() for name in meta["members"])
    assert meta["chosen"] == outcome.chosen and meta["feature_columns"] == columns
    assert meta["metrics"] == outcome.metrics and meta["train_positive_rate"] == outcome.positives / outcome.n_train
    assert {"python", "numpy", "pandas", "scikit-learn"} <= set(meta["versions"])
    loaded = load_model(tmp_path)
    reordered = matrix[["label", *columns[::-1], "user_id"]]  # column order in the frame does not matter
    np.testing.assert_array_equal(loaded.predict(reordered), outcome.models[outcome.chosen].predict(matrix))


def test_the_ensemble_averages_its_members_and_round_trips(planted, tmp_path):
    matrix, columns, outcome = planted
    members = [outcome.models[name].predict(matrix) for name in FAST_MODELS]
    np.testing.assert_allclose(outcome.models[ENSEMBLE].predict(matrix), np.mean(members, axis=0), rtol=1e-12)
    save_model(dataclasses.replace(outcome, chosen=ENSEMBLE), tmp_path)
    restored = load_model(tmp_path)
    assert restored.name == ENSEMBLE and [member.name for member in restored.model] == list(FAST_MODELS)
    np.testing.assert_allclose(restored.predict(matrix), outcome.models[ENSEMBLE].predict(matrix), rtol=1e-12)


def test_every_combination_of_candidates_competes_and_a_pair_round_trips(tmp_path):
    matrix, columns = planted_matrix(seed=3)
    # All three models, in another order and one twice: the candidates and their names do not depend on it.
    outcome = train_candidates(matrix, columns, models=[*training.MODELS[::-1], "keras_mlp"])
    assert set(outcome.metrics) == {*training.MODELS, *PAIRS, ENSEMBLE}
    assert outcome.chosen == min(outcome.metrics, key=lambda name: outcome.metrics[name]["log_loss"])
    _, validation = split_of(matrix)
    rows, rate = matrix[validation], outcome.models["logistic_regression"].train_positive_rate
    for name in [*PAIRS, ENSEMBLE]:
        members = name.split("+") if name != ENSEMBLE else list(training.MODELS)
        assert [member.name for member in outcome.models[name].model] == members
        mean = np.mean([outcome.models[member].predict(rows) for member in members], axis=0)
        # Exactly the members' mean, also where they share one signed_log1p of the rows.
        np.testing.assert_array_equal(outcome.models[name].predict(rows), mean)
        expected = summarise(rows["label"].to_numpy(), to_prior(mean, rate))["log_loss"]
        assert outcome.metrics[name]["log_loss"] == pytest.approx(expected, rel=1e-9), name

    pair = "hist_gradient_boosting+keras_mlp"
    save_model(dataclasses.replace(outcome, chosen=pair), tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["members"] == ["hist_gradient_boosting", "keras_mlp"]
    restored = load_model(tmp_path)
    assert restored.name == ENSEMBLE and [member.name for member in restored.model] == pair.split("+")
    np.testing.assert_allclose(restored.predict(matrix), outcome.models[pair].predict(matrix), rtol=1e-6)


def test_refuses_a_matrix_without_both_classes_or_enough_rows():
    matrix, columns = planted_matrix(n_users=500)
    with pytest.raises(ValueError, match=r"has 0 positives for 500 users.*widen the horizon or wait for more data"):
        train_candidates(matrix.assign(label=0), columns, models=FAST_MODELS)
    with pytest.raises(ValueError, match="has .* positives for 60 users"):
        train_candidates(matrix.head(60), columns, models=FAST_MODELS)
    with pytest.raises(ValueError, match=r"lacks columns \['f__missing'\]"):
        train_candidates(matrix, [*columns, "f__missing"], models=FAST_MODELS)
    with pytest.raises(ValueError, match="unknown or no models"):
        train_candidates(matrix, columns, models=("xgboost",))


# --- TFRecord and the Keras candidate --------------------------------------------------------------------------------


def test_tfrecord_round_trip(tmp_path):
    tf = import_tensorflow()
    matrix, columns = planted_matrix(n_users=300, n_features=5)
    path = tmp_path / "matrix.tfrecord"
    write_tfrecord(matrix, path, columns)
    batches = list(tfrecord_dataset(path, len(columns), batch_size=64))
    assert [len(features) for features, _ in batches] == [64, 64, 64, 64, 44]
    np.testing.assert_array_equal(np.concatenate([f for f, _ in batches]), matrix[columns].to_numpy(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), matrix["label"].to_numpy(np.float32))
    first = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(str(path)))).numpy()).features.feature
    assert first["user_id"].bytes_list.value == [b"user-0-0"]

    inference = tmp_path / "inference.tfrecord"
    write_tfrecord(matrix.drop(columns="label"), inference, columns, label_column=None)
    features = next(iter(tfrecord_dataset(inference, len(columns), batch_size=300, with_label=False)))
    np.testing.assert_array_equal(features, matrix[columns].to_numpy(np.float32))


def test_tfrecord_stream_selects_exactly_the_training_users(tmp_path):
    matrix, columns = planted_matrix(n_users=2000, n_features=3)
    matrix[columns[0]] = np.arange(len(matrix), dtype=float)  # a row id travels inside the features
    path = tmp_path / "matrix.tfrecord"
    write_tfrecord(matrix, path, columns)
    train, _ = split_of(matrix)
    stream = tfrecord_dataset(path, len(columns), 128, user_ids=matrix["user_id"][train], shuffle_buffer=500, seed=1)
    sizes, rows = [], []
    for features, _ in stream:
        sizes.append(len(features))
        rows.extend(features.numpy()[:, 0].astype(int))
    assert sorted(rows) == np.flatnonzero(train).tolist()
    assert all(size == 128 for size in sizes[:-1])  # filtered batches are refilled


@pytest.fixture(scope="module")
def keras_from_tfrecord(tmp_path_factory):
    matrix, columns = planted_matrix(seed=1)
    path = tmp_path_factory.mktemp("tfrecord") / "matrix.tfrecord"
    write_tfrecord(matrix, path, columns)
    return matrix, columns, path, train_candidates(matrix, columns, models=("keras_mlp",), tfrecord_path=path)


def test_keras_mlp_trains_from_the_tfrecord_stream(keras_from_tfrecord):
    matrix, columns, path, outcome = keras_from_tfrecord
    assert outcome.chosen == "keras_mlp"
    assert outcome.metrics["keras_mlp"]["auc"] > 0.75
    at_prior = to_prior(outcome.validation_predictions["raw_score"], outcome.models["keras_mlp"].train_positive_rate)
    assert abs(at_prior.mean() - matrix["label"].mean()) < 0.05


def test_keras_model_round_trip_scores_without_tensorflow(keras_from_tfrecord, tmp_path):
    matrix, columns, path, outcome = keras_from_tfrecord
    save_model(outcome, tmp_path)
    assert (tmp_path / "keras_mlp.tflite").exists()
    assert {"tensorflow", "keras", "ai-edge-litert"} <= set(json.loads((tmp_path / META_FILE).read_text())["versions"])
    np.testing.assert_array_equal(load_model(tmp_path).predict(matrix), outcome.models["keras_mlp"].predict(matrix))
    # A scoring process (transform, endpoint) loads and runs the network without importing TensorFlow.
    matrix.to_parquet(tmp_path / "matrix.parquet")
    script = (
        "import sys, pandas as pd; from automl_assets.core.training import load_model; "
        f"scores = load_model({str(tmp_path)!r}).predict(pd.read_parquet({str(tmp_path / 'matrix.parquet')!r})); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'; "
        "print(len(scores))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0 and result.stdout.strip() == str(len(matrix)), result.stderr
    (tmp_path / "keras_mlp.tflite").rename(tmp_path / "keras_mlp.keras")  # as an earlier version saved it
    with pytest.raises(FileNotFoundError, match=r"keras_mlp.keras, saved before .* retrain it"):
        load_model(tmp_path)


def test_the_lite_network_scores_as_keras_does_in_any_batch():
    import keras

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 12)).astype(np.float32)
    network = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    lite = training.LiteNetwork.from_keras(network)
    whole = lite.predict(X)
    np.testing.assert_allclose(whole, network.predict_on_batch(X)[:, 0], rtol=1e-5, atol=1e-6)
    in_batches = np.concatenate([lite.predict(X[start : start + 7]) for start in range(0, len(X), 7)])
    np.testing.assert_array_equal(in_batches, whole)  # a user's score does not depend on who shares the batch


def test_tfrecord_of_another_matrix_is_refused(keras_from_tfrecord, tmp_path):
    matrix, columns, _, _ = keras_from_tfrecord
    half = tmp_path / "half.tfrecord"
    write_tfrecord(matrix.head(len(matrix) // 2), half, columns)
    with pytest.raises(Exception, match="expected to contain"):
        train_candidates(matrix, columns, models=("keras_mlp",), tfrecord_path=half)


# --- the SageMaker entry script --------------------------------------------------------------------------------------


def sagemaker_env(root: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SM_")}
    env.update(
        SM_MODEL_DIR=str(root / "model"),
        SM_CHANNEL_TRAIN=str(root / "input/data/train"),
        SM_CHANNEL_INPUT=str(root / "input/data/input"),
        SM_OUTPUT_DATA_DIR=str(root / "output/data"),
        SM_OUTPUT_DIR=str(root / "output"),
        SM_INPUT_CONFIG_DIR=str(root / "input/config"),
        **extra,
    )
    return env


def run_entry(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory):
    """A training job run as SageMaker runs it: a module in a subprocess, /opt/ml-style tree, string hyperparameters."""
    root = tmp_path_factory.mktemp("opt_ml")
    matrix, columns = planted_matrix(seed=2)
    channel = root / "input/data/train"
    channel.mkdir(parents=True)
    matrix.to_parquet(channel / "matrix.parquet", index=False)
    write_tfrecord(matrix, channel / "matrix.tfrecord", columns)
    (root / "input/config").mkdir(parents=True)
    hyperparameters = {
        "models": json.dumps(["logistic_regression", "hist_gradient_boosting", "keras_mlp"]),
        "feature_columns": json.dumps(columns),
        "validation_fraction": "0.2",
        "seed": "0",
        "sagemaker_program": "sagemaker_entry.py",
    }
    (root / "input/config/hyperparameters.json").write_text(json.dumps(hyperparameters))
    result = run_entry(["-m", "automl_assets.core.sagemaker_entry", "train"], sagemaker_env(root), PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, matrix, columns, result


def test_train_job_writes_model_metrics_and_validation_predictions(trained_job):
    root, matrix, columns, result = trained_job
    metrics = json.loads((root / "output/data/metrics.json").read_text())
    assert set(metrics["metrics"]) == {*training.MODELS, *PAIRS, ENSEMBLE}
    assert metrics["chosen"] == min(metrics["metrics"], key=lambda name: metrics["metrics"][name]["log_loss"])
    assert metrics["n_train"] + metrics["n_validation"] == len(matrix)
    assert "validation:log_loss=" in result.stdout

    meta = json.loads((root / "model" / META_FILE).read_text())
    assert meta["feature_columns"] == columns and meta["chosen"] == metrics["chosen"]
    for name in meta["members"]:
        assert (root / "model" / (f"{name}.tflite" if name == "keras_mlp" else f"{name}.joblib")).exists()

    predictions = pd.read_parquet(root / "output/data/validation_predictions.parquet")
    assert list(predictions.columns) == ["user_id", "raw_score", "label"]
    _, validation = split_of(matrix)
    assert predictions["user_id"].tolist() == matrix["user_id"][validation].tolist()
    assert predictions["raw_score"].between(0, 1).all()
    assert not (root / "output/failure").exists()


def test_transform_job_scores_match_load_model(trained_job, tmp_path):
    root, matrix, columns, _ = trained_job
    inputs = root / "input/data/input"
    (inputs / "part=1").mkdir(parents=True)
    # inference matrices: no label, any column order, split over files
    unlabelled = matrix.drop(columns="label")[["user_id", *columns[::-1]]]
    unlabelled.iloc[:1000].to_parquet(inputs / "a.parquet", index=False)
    unlabelled.iloc[1000:].to_parquet(inputs / "part=1" / "b.parquet", index=False)
    script = PROJECT_ROOT / "automl_assets/core/sagemaker_entry.py"  # run as a file, from elsewhere
    result = run_entry([str(script), "transform"], sagemaker_env(root), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    scores = pd.read_parquet(root / "output/data/scores.parquet")
    assert list(scores.columns) == ["user_id", "raw_score"]
    assert sorted(scores["user_id"]) == sorted(matrix["user_id"])
    expected = pd.Series(load_model(root / "model").predict(matrix), index=matrix["user_id"])
    np.testing.assert_allclose(scores["raw_score"], expected[scores["user_id"]].to_numpy(), rtol=1e-5)  # float32 nets


def test_transform_reads_batches_ahead_across_files_in_their_order(trained_job, tmp_path, monkeypatch):
    """In-process, with batches small enough that the reader runs ahead of the model and across files."""
    root, matrix, columns, _ = trained_job
    inputs = tmp_path / "input"
    inputs.mkdir()
    unlabelled = matrix.drop(columns="label")
    unlabelled.iloc[:1100].to_parquet(inputs / "a.parquet", index=False)
    unlabelled.iloc[1100:].to_parquet(inputs / "b.parquet", index=False)
    monkeypatch.setattr(sagemaker_entry, "TRANSFORM_BATCH_ROWS", 128)  # 24 batches, READ_AHEAD at a time
    monkeypatch.setenv("SM_MODEL_DIR", str(root / "model"))
    monkeypatch.setenv("SM_CHANNEL_INPUT", str(inputs))
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(tmp_path / "output"))
    sagemaker_entry.transform()
    scores = pd.read_parquet(tmp_path / "output/scores.parquet")
    assert scores["user_id"].tolist() == matrix["user_id"].tolist()
    np.testing.assert_allclose(scores["raw_score"], load_model(root / "model").predict(matrix), rtol=1e-6)

    unlabelled.iloc[1100:].drop(columns=columns[3]).to_parquet(inputs / "b.parquet", index=False)
    with pytest.raises(Exception, match=columns[3]):  # read in the reader's thread, raised in the job's
        sagemaker_entry.transform()


def test_serving_hooks_score_like_load_model(trained_job):
    root, matrix, columns, _ = trained_job
    model = sagemaker_entry.model_fn(root / "model")
    rows = matrix.head(5).drop(columns="label")
    for content_type, body in [
        ("application/json", rows.to_json(orient="records")),
        ("application/x-parquet", rows.to_parquet(index=False)),
    ]:
        prediction = sagemaker_entry.predict_fn(sagemaker_entry.input_fn(body, content_type), model)
        answer = json.loads(sagemaker_entry.output_fn(prediction, "application/json"))
        assert [row["user_id"] for row in answer] == rows["user_id"].tolist()
        np.testing.assert_allclose([row["raw_score"] for row in answer], model.predict(rows), rtol=1e-6)
    tiny = pd.DataFrame({"user_id": ["a", "b"], "raw_score": [7.3e-12, 0.1234567890123]})  # JSON keeps their digits
    answer = json.loads(sagemaker_entry.output_fn(tiny, "application/json"))
    np.testing.assert_allclose([row["raw_score"] for row in answer], tiny["raw_score"], rtol=1e-12)
    as_parquet = pd.read_parquet(io.BytesIO(sagemaker_entry.output_fn(prediction, "application/x-parquet")))
    pd.testing.assert_frame_equal(as_parquet, prediction)
    with pytest.raises(ValueError, match="unsupported content type"):
        sagemaker_entry.input_fn("a,b", "text/csv")


def test_endpoint_serves_the_model_until_it_is_deleted(trained_job, tmp_path):
    root, matrix, _, _ = trained_job
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    rows = matrix.drop(columns="label").head(50)
    try:
        endpoint = sagemaker.deploy("test-endpoint", root / "model", print)
        assert sagemaker.deploy("test-endpoint", root / "model", print) == endpoint  # already serves that model
        assert sagemaker.list_endpoints() == [endpoint]
        answer = sagemaker.invoke(endpoint, rows)
        assert answer["user_id"].tolist() == rows["user_id"].tolist()
        np.testing.assert_allclose(answer["raw_score"], load_model(root / "model").predict(rows), rtol=1e-6)
        # SageMaker's clients send JSON and get JSON back unless they ask otherwise.
        body = rows.head(2).to_json(orient="records").encode()
        request = urllib.request.Request(f"{endpoint.url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert [row["user_id"] for row in json.loads(response.read())] == rows["user_id"].head(2).tolist()
        with pytest.raises(dg.Failure, match=r"refused the request \(400\): KeyError") as refused:
            sagemaker.invoke(endpoint, rows[["user_id"]])  # no feature columns
        assert not isinstance(refused.value, EndpointUnavailable)  # the rows' fault: a batch transform would fail too
        # An address now answered by another process (the endpoint replaced, its port taken) is not this endpoint.
        with pytest.raises(EndpointUnavailable, match="another process .* answered"):
            sagemaker.invoke(dataclasses.replace(endpoint, pid=endpoint.pid + 1), rows)
        stopped = sagemaker.delete_endpoint("test-endpoint")
    finally:
        sagemaker.delete_endpoint("test-endpoint")
    assert stopped and sagemaker.describe_endpoint("test-endpoint") is None
    assert not sagemaker.delete_endpoint("test-endpoint")
    with pytest.raises(EndpointUnavailable, match="test-endpoint at .* did not answer"):
        sagemaker.invoke(endpoint, rows)


def test_endpoint_is_replaced_by_a_retrained_model_and_deployed_once_by_parallel_runs(trained_job, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_job[0] / "model", model_dir)
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two hourly runs at once
            first, second = pool.map(lambda _: sagemaker.deploy("shared", model_dir, print), range(2))
        assert first == second
        meta = model_dir / META_FILE
        meta.write_text(meta.read_text())  # retrained into the same folder
        replacement = sagemaker.deploy("shared", model_dir, print)
        assert replacement.pid != first.pid and replacement.model_version != first.model_version
        assert sagemaker.list_endpoints() == [replacement]
        with pytest.raises(ProcessLookupError):
            os.kill(first.pid, 0)
    finally:
        sagemaker.delete_endpoint("shared")


def test_endpoint_that_hangs_is_still_stopped_and_a_recycled_pid_is_left_alone(trained_job, tmp_path):
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    spawned = []
    try:
        hung = sagemaker.deploy("hung", trained_job[0] / "model", print)
        spawned.append(hung.pid)
        os.kill(hung.pid, signal.SIGSTOP)
        # Paused for longer than one ping's timeout, then back: a slow ping does not make it look down.
        threading.Timer(2.5, os.kill, (hung.pid, signal.SIGCONT)).start()
        assert sagemaker.describe_endpoint("hung") == hung
        os.kill(hung.pid, signal.SIGSTOP)
        assert sagemaker.describe_endpoint("hung") is None  # does not answer /ping, three times in a row
        assert sagemaker.delete_endpoint("hung")
        with pytest.raises(ProcessLookupError):
            os.kill(hung.pid, 0)
        recycled = sagemaker.deploy("recycled", trained_job[0] / "model", print)
        spawned.append(recycled.pid)
        state = tmp_path / "endpoints" / "recycled.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "started": "1"}))  # its pid is another process's
        assert sagemaker.describe_endpoint("recycled") is None
        assert not sagemaker.delete_endpoint("recycled")
        os.kill(recycled.pid, 0)  # not signalled
    finally:
        for pid in spawned:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def test_endpoint_answers_500_when_the_model_fails(tmp_path):
    class FailingModel:
        feature_columns = ["f"]

        def predict(self, rows):
            raise RuntimeError("out of memory")

    server = sagemaker_entry._EndpointServer(("127.0.0.1", 0), FailingModel())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d" % server.server_address[1]
        endpoint = Endpoint("failing", url, os.getpid(), "", str(tmp_path), "")
        with pytest.raises(dg.Failure, match=r"refused the request \(500\): RuntimeError: out of memory"):
            LocalSageMaker(work_root=str(tmp_path)).invoke(endpoint, pd.DataFrame({"user_id": ["u"], "f": [1.0]}))
        request = urllib.request.Request(f"{url}/invocations", data=b"[]", headers={"Content-Length": "many"})
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(request)
    finally:
        server.shutdown()
        server.server_close()


def test_an_idle_endpoint_stops_itself_and_a_broken_one_says_why(trained_job, tmp_path):
    root, _, _, _ = trained_job
    sagemaker = LocalSageMaker(work_root=str(tmp_path), endpoint_idle_minutes=0.05)
    try:
        sagemaker.deploy("idle", root / "model", print)
        deadline = time.monotonic() + 60
        while sagemaker.describe_endpoint("idle") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sagemaker.describe_endpoint("idle") is None
        assert "no invocation for 3 s: stopping" in (tmp_path / "endpoints" / "idle" / "endpoint.log").read_text()
    finally:
        sagemaker.delete_endpoint("idle")
    with pytest.raises(dg.Failure, match="did not come up serving .*missing: FileNotFoundError") as broken:
        sagemaker.deploy("broken", tmp_path / "missing", print)
    assert not isinstance(broken.value, EndpointUnavailable)  # the model cannot be loaded: a transform would fail too


def test_an_endpoint_whose_deploy_is_interrupted_is_not_left_running(trained_job, tmp_path, monkeypatch):
    """A run terminated while its endpoint starts (Dagster raises a BaseException in the step) kills the process:
    no state file names it yet, so `automl endpoints --stop all` could not."""
    import resources.sagemaker as sagemaker_module

    class Terminated(BaseException):
        pass

    spawned = []
    spawn = os.posix_spawn
    monkeypatch.setattr(os, "posix_spawn", lambda *args, **kwargs: spawned.append(spawn(*args, **kwargs)) or spawned[-1])

    def terminated_while_pinging(url, pid, attempts=1):
        raise Terminated

    monkeypatch.setattr(sagemaker_module, "_answers_ping", terminated_while_pinging)
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    with pytest.raises(Terminated):
        sagemaker.deploy("interrupted", trained_job[0] / "model", print)
    assert len(spawned) == 1
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(spawned[0], 0)
    assert sagemaker.endpoint_names() == []


def test_an_endpoint_that_does_not_name_its_process_is_replaced(trained_job, tmp_path):
    """An endpoint started by a version whose replies lack the process header (or any server now on its address) is
    not taken for the endpoint: deploy stops it and starts one that names itself, instead of reusing it forever."""
    from resources.sagemaker import _model_version, _process_start

    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    model_dir = (trained_job[0] / "model").resolve()
    old = subprocess.Popen(
        [sys.executable, "-c", "import http.server as h\n"
         "class H(h.BaseHTTPRequestHandler):\n"
         "    def do_GET(self): self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()\n"
         "s = h.HTTPServer(('127.0.0.1', 0), H); print(s.server_address[1], flush=True); s.serve_forever()"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{old.stdout.readline().strip()}"
        with urllib.request.urlopen(f"{url}/ping") as response:
            assert response.status == 200  # it answers, as an endpoint of the older version did
        state = Endpoint("upgraded", url, old.pid, _process_start(old.pid), str(model_dir), _model_version(model_dir))
        (tmp_path / "endpoints").mkdir(parents=True)
        (tmp_path / "endpoints" / "upgraded.json").write_text(json.dumps(dataclasses.asdict(state)))
        assert sagemaker.describe_endpoint("upgraded") is None
        replacement = sagemaker.deploy("upgraded", model_dir, print)
        assert replacement.pid != old.pid and old.wait(timeout=10) is not None  # stopped by the deploy
        assert sagemaker.invoke(replacement, trained_job[1].drop(columns="label").head(3))["user_id"].size == 3
    finally:
        sagemaker.delete_endpoint("upgraded")
        old.kill()
        old.wait()


def test_a_reply_cut_short_is_an_unavailable_endpoint(tmp_path):
    """An endpoint stopped while it writes its answer (replaced under the run calling it) leaves a short body: the run
    may score another way, as for a refused connection."""
    import http.server

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"PAR1")  # then the connection closes

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), CutShort) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        endpoint = Endpoint("cut", f"http://127.0.0.1:{server.server_address[1]}", os.getpid(), "running", "", "")
        with pytest.raises(EndpointUnavailable, match="IncompleteRead"):
            LocalSageMaker(work_root=str(tmp_path)).invoke(endpoint, pd.DataFrame({"user_id": ["u1"]}))


def test_cli_lists_and_stops_endpoints(trained_job, tmp_path, monkeypatch, capsys):
    from automl_assets.cli import main

    monkeypatch.setenv("AUTOML_SAGEMAKER_ROOT", str(tmp_path))
    sagemaker = LocalSageMaker(work_root=str(tmp_path))
    try:
        assert main(["endpoints"]) == 0
        assert "no endpoint is running" in capsys.readouterr().out
        endpoint = sagemaker.deploy("automl-buy-7d", trained_job[0] / "model", print)
        capsys.readouterr()
        assert main(["endpoints"]) == 0
        assert f"automl-buy-7d  {endpoint.url}  pid {endpoint.pid}" in capsys.readouterr().out
        assert main(["endpoints", "--stop", "all"]) == 0
        assert capsys.readouterr().out == "automl-buy-7d: stopped\n"
        assert sagemaker.describe_endpoint("automl-buy-7d") is None
    finally:
        sagemaker.delete_endpoint("automl-buy-7d")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, HourlyEndpoint.AUTOMATED),
        ("automated", HourlyEndpoint.AUTOMATED),
        ("1", HourlyEndpoint.ALWAYS),
        ("always", HourlyEndpoint.ALWAYS),
        ("0", HourlyEndpoint.NEVER),
        (" Never ", HourlyEndpoint.NEVER),
    ],
)
def test_hourly_endpoint_setting_defaults_to_automated_runs(value, expected, monkeypatch):
    from resources.environments import hourly_endpoint_from_env

    if value is None:
        monkeypatch.delenv("AUTOML_HOURLY_ENDPOINT", raising=False)
    else:
        monkeypatch.setenv("AUTOML_HOURLY_ENDPOINT", value)
    assert hourly_endpoint_from_env() is expected
    sagemaker = LocalSageMaker(hourly_endpoint=expected)
    by_sensor = {"dagster/sensor_name": "score_after_ingest"}
    by_schedule = {"dagster/schedule_name": "hourly"}
    retried_by_the_daemon = {**by_sensor, "dagster/parent_run_id": "a", "dagster/retry_number": "1"}
    by_hand = {"automl/scope": "active"}
    re_executed_by_hand = {**by_sensor, "dagster/parent_run_id": "a"}  # a re-execution keeps its parent's tags
    for automated in (by_sensor, by_schedule, retried_by_the_daemon):
        assert sagemaker.scores_hourly_through_endpoint(automated) is (expected is not HourlyEndpoint.NEVER)
    for manual in (by_hand, re_executed_by_hand):
        assert sagemaker.scores_hourly_through_endpoint(manual) is (expected is HourlyEndpoint.ALWAYS)


def test_an_unknown_hourly_endpoint_setting_says_what_is_accepted(monkeypatch):
    from resources.environments import resources_for_env

    monkeypatch.setenv("AUTOML_HOURLY_ENDPOINT", "yes")
    with pytest.raises(ValueError, match="AUTOML_HOURLY_ENDPOINT='yes' is not understood; use automated"):
        resources_for_env()


def test_single_class_matrix_fails_the_job_with_a_readable_reason(tmp_path):
    matrix, columns = planted_matrix(n_users=400)
    channel = tmp_path / "input/data/train"
    channel.mkdir(parents=True)
    matrix.assign(label=0).to_parquet(channel / "matrix.parquet", index=False)
    env = sagemaker_env(tmp_path, SM_HPS=json.dumps({"models": '["logistic_regression"]', "seed": 0}))
    result = run_entry(["-m", "automl_assets.core.sagemaker_entry", "train"], env, PROJECT_ROOT)
    assert result.returncode == 1
    reason = (tmp_path / "output/failure").read_text()
    assert reason.startswith("ValueError: the training matrix has 0 positives for 400 users")
    assert "widen the horizon or wait for more data" in reason
    assert not (tmp_path / "model").exists()


def test_hyperparameters_are_decoded_from_sagemaker_strings(monkeypatch):
    monkeypatch.setenv(
        "SM_HPS",
        json.dumps({"models": '["keras_mlp"]', "validation_fraction": "0.25", "seed": 3, "sagemaker_region": "eu-west-1"}),
    )
    assert sagemaker_entry.read_hyperparameters() == {"models": ["keras_mlp"], "validation_fraction": 0.25, "seed": 3}
    monkeypatch.setenv("SM_HPS", json.dumps({"validation_fration": "0.2"}))
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        sagemaker_entry.read_hyperparameters()
