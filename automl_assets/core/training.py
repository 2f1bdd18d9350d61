"""Train candidate models on a labelled feature matrix, pick the best on held-out users, and save/load it.

Every candidate is trained with balanced classes (conversions are rare: unweighted, the loss barely sees them) and its
outputs are mapped back to the training prior, so that the raw scores of all candidates are probabilities on the same
scale: comparable by log-loss, and a sensible input for the calibrator.
"""

import functools
import io
import itertools
import json
import logging
import os
import platform
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from automl_assets.core.calibration import to_prior
from automl_assets.core.matrices import feature_array
from automl_assets.core.metrics import summarise
from automl_assets.core.splits import MAX_TRAINING_USERS, SPLIT_SEED, VALIDATION_FRACTION, split_users, user_fraction
from automl_assets.core.tfrecord import import_tensorflow, tfrecord_dataset

log = logging.getLogger(__name__)

KERAS_MLP = "keras_mlp"
MODELS = ("logistic_regression", "hist_gradient_boosting", KERAS_MLP)
# Means of the fitted candidates' raw scores are candidates like the others, chosen only when their validation
# log-loss is the lowest. Averaging models that err differently is steadier than picking one of them (docs/
# evaluation.md); every combination competes (ensemble selection), as a weak member drags an average down.
# `ensemble` is the mean of them all, a mean of some is named by its members joined with "+".
ENSEMBLE = "ensemble"
# Candidates whose input is signed_log1p of the features (in the logistic regression's pipeline, before the network).
TAKE_LOGGED = ("logistic_regression", KERAS_MLP)
# Share of the training users (by a keyed hash, all rows of a user together) the gradient boosting and Keras
# candidates stop early on: the validation users must stay unseen by every candidate, or the comparison favours the
# one that peeked; and a user's stacked snapshots must all be on one side, or the held-out loss keeps improving on
# rows the candidate has all but seen.
EARLY_STOPPING_FRACTION = 0.1
EARLY_STOPPING_SEED = 2  # differs from the training split's and the calibrator's seeds
META_FILE = "model_meta.json"
# Below these the validation metrics (and the calibrator fitted on the validation predictions) are noise.
MIN_ROWS = 100
MIN_PER_CLASS = 10
KERAS_BATCH_SIZE = 256
KERAS_MAX_EPOCHS = 10
KERAS_SHUFFLE_BUFFER = 10_000  # records; about 16 MB at 400 features
# Rows the Keras network scores per call (and a transform's batch); larger inputs are split, as the network's inputs
# are normalised into a copy.
PREDICT_BATCH_SIZE = 100_000
# Columns of a training matrix that are not features: the user, the stacked snapshot (weeks back), the label.
NOT_FEATURES = ("user_id", "snapshot", "label")


def signed_log1p(x, xp=np):
    """sign(x)·log(1+|x|): tames heavy-tailed counts, and is defined for negative values too.

    ``xp`` is the array namespace (``np``, or ``tf.math`` inside a tf.data pipeline): one definition for both.
    """
    if xp is np:  # the same formula in one new array: scoring a million users spends seconds on temporaries
        x = np.asarray(x)
        out = np.abs(x, dtype=np.result_type(x, np.float32))
        return np.copysign(np.log1p(out, out=out), x, out=out)
    return xp.sign(x) * xp.log1p(xp.abs(x))


def _require_both_classes(labels: np.ndarray, what: str, min_rows: int, min_per_class: int) -> None:
    positives = int(labels.sum())
    negatives = labels.size - positives
    if labels.size < min_rows or min(positives, negatives) < min_per_class:
        raise ValueError(
            f"the {what} has {positives} positives for {labels.size} users ({negatives} negatives; at least "
            f"{min_rows} users and {min_per_class} of each class are needed): widen the horizon or wait for more data"
        )


@dataclass
class _TrainingData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_validation: np.ndarray
    y_validation: np.ndarray
    train_user_ids: np.ndarray
    tfrecord_path: str | None
    seed: int


def _fit_logistic_regression(data: _TrainingData):
    model = make_pipeline(
        FunctionTransformer(signed_log1p),
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=1000),
    )
    return model.fit(data.X_train, data.y_train)


def _binning_thresholds(sklearn_thresholds, col_data, max_bins, sample_weight=None):
    """scikit-learn's bin edges for HistGradientBoosting, with the weighted quantiles taken in one
    ``_weighted_percentile`` call per feature instead of one per edge.

    scikit-learn 1.8 and 1.9 sort a feature's values again for each of its 254 weighted edges. With class weights and
    fewer than 200k rows (above that they subsample instead of weighting) that was half of a gradient boosting fit on
    P3's training matrix (27.8 s, 13.6 s without). The same function asked for every edge at once returns the same
    values (tests/test_training.py); scikit-learn's pull request 34248 makes this change upstream, after 1.9."""
    from sklearn.ensemble._hist_gradient_boosting.common import ALMOST_INF
    from sklearn.utils.stats import _weighted_percentile

    if sample_weight is None:
        return sklearn_thresholds(col_data, max_bins)
    # The values scikit-learn takes quantiles of: no missing values, no zero weights, sorted.
    kept = ~np.isnan(col_data) & (sample_weight != 0)
    col_data, sample_weight = col_data[kept], sample_weight[kept]
    order = np.argsort(col_data)
    col_data, sample_weight = col_data[order], sample_weight[order]
    if len(np.unique(col_data)) <= max_bins:
        return sklearn_thresholds(col_data, max_bins)  # midpoints of the distinct values: weights play no part
    percentiles = np.linspace(0, 100, num=max_bins + 1)[1:-1]
    edges = np.unique(_weighted_percentile(col_data, sample_weight, percentiles, average=True))
    return np.clip(edges, a_min=None, a_max=ALMOST_INF)


@contextmanager
def _weighted_edges_in_one_call():
    """_binning_thresholds in place of scikit-learn's own, for the versions whose code it follows (1.8 and 1.9; later
    ones have the upstream change). Process-wide while it lasts: a training job fits one candidate at a time."""
    if not (1, 8) <= tuple(int(part) for part in sklearn.__version__.split(".")[:2]) < (1, 10):
        yield
        return
    from sklearn.ensemble._hist_gradient_boosting import binning

    original = binning._find_binning_thresholds
    binning._find_binning_thresholds = functools.partial(_binning_thresholds, original)
    try:
        yield
    finally:
        binning._find_binning_thresholds = original


def _early_stopping_rows(data: _TrainingData) -> np.ndarray:
    """The training rows of the users a candidate stops early on (EARLY_STOPPING_FRACTION of them)."""
    return user_fraction(data.train_user_ids, EARLY_STOPPING_SEED) < EARLY_STOPPING_FRACTION


def _fit_hist_gradient_boosting(data: _TrainingData):
    stopping = _early_stopping_rows(data)
    y_fit, y_stop = data.y_train[~stopping], data.y_train[stopping]
    # The held-out rows weigh their classes as the fitted ones do (scikit-learn applies class_weight to the latter).
    class_weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=y_fit)
    model = HistGradientBoostingClassifier(
        max_iter=200, early_stopping=True, n_iter_no_change=10, class_weight="balanced", random_state=data.seed
    )
    with _weighted_edges_in_one_call():
        return model.fit(
            data.X_train[~stopping], y_fit, X_val=data.X_train[stopping], y_val=y_stop, sample_weight_val=class_weights[y_stop]
        )


def _fit_keras_mlp(data: _TrainingData):
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(data.seed)  # weight initialisation and shuffling draw from the global seeds
    stopping = _early_stopping_rows(data)
    X_fit, y_fit = data.X_train[~stopping], data.y_train[~stopping]
    transformed = signed_log1p(X_fit)
    variance = transformed.var(axis=0)
    variance[variance == 0] = 1.0  # constant features: centre them, do not divide by zero
    model = keras.Sequential(
        [
            keras.Input((X_fit.shape[1],)),
            keras.layers.Normalization(mean=transformed.mean(axis=0), variance=variance),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    w_negative, w_positive = (float(w) for w in compute_class_weight("balanced", classes=np.array([0, 1]), y=y_fit))

    def sample_weight(y, xp=np):  # the weights class_weight="balanced" gives the scikit-learn candidates
        return xp.where(y == 1, w_positive, w_negative)

    if data.tfrecord_path is None:
        train = {
            "x": transformed,
            "y": y_fit,
            "sample_weight": sample_weight(y_fit),
            "batch_size": KERAS_BATCH_SIZE,
        }
    else:
        # Stream the fitting users' rows from the TFRecord file: the same users as the in-memory split, by id.
        stream = tfrecord_dataset(
            data.tfrecord_path,
            X_fit.shape[1],
            KERAS_BATCH_SIZE,
            user_ids=np.unique(data.train_user_ids[~stopping]),
            shuffle_buffer=KERAS_SHUFFLE_BUFFER,
            seed=data.seed,
        )
        # The stream must yield the in-memory fitting rows: declaring their batch count lets Keras plan its epochs,
        # and makes a TFRecord file written from another matrix fail at the end of the first epoch.
        batches = -(-len(y_fit) // KERAS_BATCH_SIZE)
        stream = stream.apply(tf.data.experimental.assert_cardinality(batches)).map(
            lambda x, y: (signed_log1p(x, tf.math), y, sample_weight(y, tf))
        )
        train = {"x": stream, "shuffle": False}  # the stream shuffles its records itself
    X_stop, y_stop = data.X_train[stopping], data.y_train[stopping]
    model.fit(
        **train,
        validation_data=(signed_log1p(X_stop), y_stop, sample_weight(y_stop)),
        epochs=KERAS_MAX_EPOCHS,
        callbacks=[keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)],
        verbose=0,
    )
    return LiteNetwork.from_keras(model)


class LiteNetwork:
    """The fitted Keras network as a LiteRT (TensorFlow Lite) flatbuffer, which is what scores it everywhere: held-out
    users, transforms and endpoints. LiteRT imports in about 0.2 s where TensorFlow takes 2.6 s, a fixed cost of
    every transform and endpoint start; its outputs match Keras' within float32 rounding and do not depend on the
    batch a row is scored in."""

    def __init__(self, flatbuffer: bytes):
        from ai_edge_litert.interpreter import Interpreter

        self.flatbuffer = flatbuffer
        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=len(os.sched_getaffinity(0)))
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._rows = None

    @classmethod
    def from_keras(cls, model) -> "LiteNetwork":
        tf = import_tensorflow()
        with redirect_stdout(io.StringIO()):  # the conversion prints the exported signature
            return cls(tf.lite.TFLiteConverter.from_keras_model(model).convert())

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Probabilities of the positive class for the rows of ``X`` (already signed_log1p'd)."""
        X = np.ascontiguousarray(X, dtype=np.float32)  # what the network takes; a no-op for feature_array's rows
        if len(X) != self._rows:  # the input's batch dimension is fixed per allocation
            self._interpreter.resize_tensor_input(self._input, X.shape)
            self._interpreter.allocate_tensors()
            self._rows = len(X)
        self._interpreter.set_tensor(self._input, X)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[:, 0].copy()


CANDIDATES = {
    "logistic_regression": _fit_logistic_regression,
    "hist_gradient_boosting": _fit_hist_gradient_boosting,
    KERAS_MLP: _fit_keras_mlp,
}


def _model_file(name: str) -> str:
    return f"{name}.tflite" if name == KERAS_MLP else f"{name}.joblib"


@dataclass
class ScoringModel:
    """A fitted candidate with what it needs to score a matrix. Raw scores are the class-balanced model's
    probabilities: the calibrator, fitted on held-out users, is the one place that maps them to real probabilities."""

    name: str  # one of MODELS, or ENSEMBLE for a mean of member ScoringModels (any combination of them)
    model: object
    feature_columns: list[str]
    train_positive_rate: float

    def predict(self, data) -> np.ndarray:
        """Raw scores for the rows of ``data``, a DataFrame or an Arrow table or record batch (which must hold
        ``feature_columns``; other columns are ignored)."""
        return self.predict_matrix(feature_array(data, self.feature_columns))

    def predict_matrix(self, X: np.ndarray, logged: np.ndarray | None = None) -> np.ndarray:
        """Raw scores for the rows of a feature matrix in ``feature_columns`` order (see feature_array); ``logged``,
        when given, is signed_log1p(X), which logistic regression and the network take."""
        if len(X) == 0:
            return np.empty(0)
        if self.name == ENSEMBLE:  # self.model: the member ScoringModels
            # signed_log1p once for the members that take it: 0.65 s of every million users' scoring per extra member.
            shared = sum(member.name in TAKE_LOGGED for member in self.model) > 1
            logged = signed_log1p(X) if shared else None
            return np.mean([member.predict_matrix(X, logged) for member in self.model], axis=0)
        if self.name == KERAS_MLP:  # self.model: a LiteNetwork
            rows = X if logged is None else logged
            chunks = (rows[start : start + PREDICT_BATCH_SIZE] for start in range(0, len(rows), PREDICT_BATCH_SIZE))
            balanced = np.concatenate(
                [self.model.predict(signed_log1p(np.ascontiguousarray(chunk)) if logged is None else chunk) for chunk in chunks]
            )
        elif self.name == "logistic_regression" and logged is not None:
            balanced = self.model[1:].predict_proba(logged)[:, 1]  # the pipeline after its signed_log1p step
        else:
            balanced = self.model.predict_proba(X)[:, 1]
        return balanced.astype(np.float64)


@dataclass
class TrainingOutcome:
    chosen: str
    models: dict[str, ScoringModel]  # every fitted candidate
    metrics: dict[str, dict]  # candidate -> metrics.summarise() on the validation users' rows: what the choice is made on
    chosen_newest: dict  # metrics.summarise() of the chosen model on the calibration rows: what promotion compares
    validation_predictions: pd.DataFrame  # user_id, raw_score (of the chosen model), label: what the calibrator fits
    feature_columns: list[str]
    n_train: int
    n_validation: int  # rows the candidates are compared on
    n_calibration: int  # rows of validation_predictions: the validation users' newest snapshot
    positives: int  # in the training split

    def summary(self) -> dict:
        """JSON-ready record of the run: written as metrics.json and inside model_meta.json."""
        return {
            "chosen": self.chosen,
            "metrics": self.metrics,
            "n_train": self.n_train,
            "n_validation": self.n_validation,
            "n_calibration": self.n_calibration,
            "chosen_newest_snapshot": self.chosen_newest,
            "positives": self.positives,
            "train_positive_rate": self.models[self.chosen].train_positive_rate,
        }


def train_candidates(
    matrix: pd.DataFrame,
    feature_columns,
    *,
    models=MODELS,
    validation_fraction: float = VALIDATION_FRACTION,
    max_training_users: int = MAX_TRAINING_USERS,
    seed: int = SPLIT_SEED,
    tfrecord_path=None,
) -> TrainingOutcome:
    """Fit each of ``models`` on the training users and choose, among them and the means of every combination of two
    or more of them, the one with the lowest log-loss on the validation users.

    A ``snapshot`` column (weeks back; 0 is the newest) marks a matrix that stacks several training cutoffs: see
    the split below.

    ``tfrecord_path``: the same matrix as a TFRecord file (see tfrecord.write_tfrecord, same feature order); the
    Keras candidate then streams its training rows from it instead of from memory.
    """
    feature_columns = list(feature_columns)
    if not feature_columns:
        raise ValueError("no feature columns to train on")
    unknown = sorted(set(models) - set(CANDIDATES))
    if unknown or not models:
        raise ValueError(f"unknown or no models {unknown or list(models)}; choose from {list(CANDIDATES)}")
    # Each once and in one order, so that a mean of candidates has the same name whatever order a spec lists them in.
    models = [name for name in CANDIDATES if name in models]
    missing = [column for column in ("user_id", "label", *feature_columns) if column not in matrix.columns]
    if missing:
        raise ValueError(f"the training matrix lacks columns {missing}")
    labels = matrix["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("label must be 0 or 1")

    snapshots = matrix["snapshot"].to_numpy() if "snapshot" in matrix.columns else None
    train, validation = split_users(
        matrix["user_id"], validation_fraction=validation_fraction, max_training_users=max_training_users, seed=seed, snapshots=snapshots
    )
    # In a stacked matrix the training users' rows of every snapshot are fitted on, and the candidates are compared on
    # every row of the validation users: on their newest snapshot alone (a few hundred users on small data) the
    # choice turned on differences far below its noise. The calibrator learns from the newest snapshot, the label
    # window closest to the one scores are about.
    calibration = validation & (snapshots == 0) if snapshots is not None else validation
    _require_both_classes(labels[train | calibration], "training matrix", MIN_ROWS, MIN_PER_CLASS)
    _require_both_classes(labels[train], "training split", 1, 1)
    _require_both_classes(labels[calibration], "validation users' newest snapshot", 1, 1)

    X = feature_array(matrix, feature_columns)
    not_finite = ~np.isfinite(X).all(axis=0)
    if not_finite.any():
        raise ValueError(f"feature columns with missing or infinite values: {np.array(feature_columns)[not_finite].tolist()}")
    data = _TrainingData(
        X_train=X[train],
        y_train=labels[train].astype(np.int64),
        # Column-major like feature_array's: float32 sums depend on the layout, and the calibrator must learn from
        # exactly the scores that scoring these users would give.
        X_validation=np.asfortranarray(X[validation]),
        y_validation=labels[validation].astype(np.int64),
        train_user_ids=matrix["user_id"].to_numpy()[train],
        tfrecord_path=None if tfrecord_path is None else str(tfrecord_path),
        seed=seed,
    )
    del X  # X[train] and X[validation] are copies: drop the full array before fitting
    newest = calibration[validation]  # the validation rows the calibrator learns from
    positive_rate = float(data.y_train.mean())

    fitted, scores, metrics = {}, {}, {}
    for name in models:
        fitted[name] = ScoringModel(name, CANDIDATES[name](data), feature_columns, positive_rate)
        scores[name] = fitted[name].predict_matrix(data.X_validation)
        # Candidates trained under balanced classes are compared at the true prior, so that log-loss measures them
        # as probabilities and not their shared rebalancing bias.
        metrics[name] = summarise(data.y_validation, to_prior(scores[name], positive_rate))
        log.info("candidate %s: %s", name, metrics[name])
    for names in _ensembles(models):
        name = ENSEMBLE if len(names) == len(models) else "+".join(names)
        fitted[name] = ScoringModel(ENSEMBLE, [fitted[member] for member in names], feature_columns, positive_rate)
        scores[name] = np.mean([scores[member] for member in names], axis=0)
        metrics[name] = summarise(data.y_validation, to_prior(scores[name], positive_rate))
        log.info("candidate %s, the mean of %s: %s", name, list(names), metrics[name])
    chosen = min(metrics, key=lambda name: metrics[name]["log_loss"])
    newest_scores, newest_labels = scores[chosen][newest], data.y_validation[newest]

    return TrainingOutcome(
        chosen=chosen,
        models=fitted,
        metrics=metrics,
        chosen_newest=summarise(newest_labels, to_prior(newest_scores, positive_rate)),
        validation_predictions=pd.DataFrame(
            {"user_id": matrix["user_id"].to_numpy()[calibration], "raw_score": newest_scores, "label": newest_labels}
        ),
        feature_columns=feature_columns,
        n_train=int(train.sum()),
        n_validation=int(validation.sum()),
        n_calibration=int(calibration.sum()),
        positives=int(data.y_train.sum()),
    )


def _ensembles(models) -> list[tuple[str, ...]]:
    """Every combination of two or more of ``models``, in their order."""
    return [names for size in range(2, len(models) + 1) for names in itertools.combinations(models, size)]


def _versions(names: list[str]) -> dict:
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
    }
    if KERAS_MLP in names:
        import keras

        # Trained with TensorFlow and Keras, scored with LiteRT.
        versions.update(
            tensorflow=import_tensorflow().__version__, keras=keras.__version__, **{"ai-edge-litert": version("ai-edge-litert")}
        )
    return versions


def _members(scoring: ScoringModel) -> list[ScoringModel]:
    return scoring.model if scoring.name == ENSEMBLE else [scoring]


def save_model(outcome: TrainingOutcome, model_dir) -> None:
    """Write the chosen model into ``model_dir``: one file per model it is made of (``<name>.joblib`` or
    ``<name>.tflite``; one per member for a mean of candidates) and ``model_meta.json``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    scoring = outcome.models[outcome.chosen]
    members = _members(scoring)
    for member in members:
        path = model_dir / _model_file(member.name)
        if member.name == KERAS_MLP:
            path.write_bytes(member.model.flatbuffer)
        else:
            joblib.dump(member.model, path)
    names = [member.name for member in members]
    meta = {**outcome.summary(), "members": names, "feature_columns": scoring.feature_columns, "versions": _versions(names)}
    (model_dir / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_member(model_dir: Path, name: str):
    path = model_dir / _model_file(name)
    if name != KERAS_MLP:
        return joblib.load(path)
    if not path.exists() and path.with_suffix(".keras").exists():
        raise FileNotFoundError(
            f"{model_dir} holds the network as keras_mlp.keras, saved before networks were scored with LiteRT: "
            "retrain it (materialise `model` for its partition)"
        )
    return LiteNetwork(path.read_bytes())


def model_meta(model_dir) -> dict:
    """What save_model wrote beside the model files: the chosen model, its members, feature columns and metrics."""
    return json.loads((Path(model_dir) / META_FILE).read_text())


def load_model(model_dir) -> ScoringModel:
    model_dir = Path(model_dir)
    meta = model_meta(model_dir)
    columns, rate = meta["feature_columns"], meta["train_positive_rate"]
    members = [ScoringModel(name, _load_member(model_dir, name), columns, rate) for name in meta["members"]]
    return ScoringModel(ENSEMBLE, members, columns, rate) if len(members) > 1 else members[0]
