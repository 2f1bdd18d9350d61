"""SageMaker entry script: ``train`` fits the candidates and saves the winner; ``transform`` scores parquet files;
``serve`` answers SageMaker's endpoint requests with the model loaded once.

Runs standalone, in a SageMaker container or locally in a subprocess with the same conventions:

    python -m automl_assets.core.sagemaker_entry train|transform|serve
    python automl_assets/core/sagemaker_entry.py train|transform|serve

Paths come from SageMaker's environment variables and default to its /opt/ml layout:
SM_MODEL_DIR (/opt/ml/model), SM_CHANNEL_TRAIN (/opt/ml/input/data/train), SM_CHANNEL_INPUT (/opt/ml/input/data/input),
SM_OUTPUT_DATA_DIR (/opt/ml/output/data), SM_OUTPUT_DIR (/opt/ml/output: the ``failure`` file),
SM_INPUT_CONFIG_DIR (/opt/ml/input/config: ``hyperparameters.json``, read when SM_HPS is not set).

train: the channel holds ``matrix.parquet`` and optionally ``matrix.tfrecord``. Hyperparameters, all optional:
``models`` (JSON list), ``feature_columns`` (JSON list; default: the matrix's columns other than user_id and label, in
file order, which also avoids SageMaker's 2,500-character limit on one hyperparameter), ``validation_fraction``,
``max_training_users``, ``seed``. Writes the model to SM_MODEL_DIR (training.save_model), and
``validation_predictions.parquet`` (user_id, raw_score, label) and ``metrics.json`` to SM_OUTPUT_DATA_DIR.

transform: every ``*.parquet`` file under SM_CHANNEL_INPUT (user_id + feature columns), read in batches, is scored into
SM_OUTPUT_DATA_DIR/``scores.parquet`` (user_id, raw_score).

serve: SageMaker's hosting contract. ``GET /ping`` answers 200 once the model in SM_MODEL_DIR is loaded; ``POST
/invocations`` takes JSON or parquet (Content-Type) and answers user_id and raw_score in the Accept type (JSON by
default), through the serving hooks below. It listens on SAGEMAKER_BIND_TO_PORT (8080) of AUTOML_SERVE_HOST (0.0.0.0,
as in a container; port 0 takes a free one and writes its number to AUTOML_SERVE_PORT_FILE) and, when
AUTOML_SERVE_IDLE_SECONDS is set, exits after that long without an invocation.

On failure either mode writes the reason to the failure file and exits with status 1, as SageMaker expects.
The serving hooks ``model_fn``, ``input_fn``, ``predict_fn`` and ``output_fn`` at the bottom serve the same model
from SageMaker's framework containers (endpoints and batch transform).
"""

import gc
import io
import itertools
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (SageMaker runs `python <entry point>`): make the project root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from automl_assets.core.matrices import feature_array
from automl_assets.core.training import (
    NOT_FEATURES,
    PREDICT_BATCH_SIZE,
    load_model,
    model_meta,
    save_model,
    train_candidates,
)

log = logging.getLogger("automl_assets.sagemaker_entry")

SM_ROOT = Path("/opt/ml")
# Hyperparameters passed to train_candidates, with the type each is cast to.
HYPERPARAMETERS = {
    "feature_columns": list,
    "models": tuple,
    "validation_fraction": float,
    "max_training_users": int,
    "seed": int,
}
TRANSFORM_BATCH_ROWS = PREDICT_BATCH_SIZE  # one network call per batch
# Batches a transform reads ahead of the model: 0.64 GB of float32 features at 400 columns.
READ_AHEAD = 4
SCORES_SCHEMA = pa.schema([("user_id", pa.string()), ("raw_score", pa.float64())])
JSON = "application/json"
PARQUET = "application/x-parquet"
# Each reply names the process that answered: a client holding an older endpoint's address (replaced meanwhile, its
# port taken by another server) can tell it is not talking to the endpoint it deployed.
ENDPOINT_PID_HEADER = "X-Automl-Endpoint-Pid"
SERVE_PORT = 8080  # where SageMaker sends a container's /ping and /invocations unless SAGEMAKER_BIND_TO_PORT says


def _sm_path(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable, SM_ROOT / default))


def _decode(value):
    """SageMaker passes hyperparameters as strings: decode the JSON-typed ones ("0.2", "[...]"), keep the others."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_hyperparameters() -> dict:
    if "SM_HPS" in os.environ:
        raw = json.loads(os.environ["SM_HPS"])
    else:
        config = _sm_path("SM_INPUT_CONFIG_DIR", "input/config") / "hyperparameters.json"
        raw = json.loads(config.read_text()) if config.exists() else {}
    # Framework containers add their own sagemaker_* entries (program, submit directory, region...).
    hyperparameters = {key: _decode(value) for key, value in raw.items() if not key.startswith("sagemaker_")}
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; known: {sorted(HYPERPARAMETERS)}")
    return hyperparameters


def read_matrix(path: Path) -> pd.DataFrame:
    """The training matrix with its float columns as float32, the precision training uses: half the memory of the
    float64 the matrix is stored in, for the whole training job."""
    table = pq.read_table(path)
    schema = pa.schema([field.with_type(pa.float32()) if pa.types.is_floating(field.type) else field for field in table.schema])
    matrix = table.cast(schema).to_pandas()
    del table
    pa.default_memory_pool().release_unused()
    return matrix


def train() -> None:
    hyperparameters = read_hyperparameters()
    options = {key: cast(hyperparameters[key]) for key, cast in HYPERPARAMETERS.items() if key in hyperparameters}
    channel = _sm_path("SM_CHANNEL_TRAIN", "input/data/train")
    matrix = read_matrix(channel / "matrix.parquet")
    options.setdefault("feature_columns", [column for column in matrix.columns if column not in NOT_FEATURES])
    tfrecord = channel / "matrix.tfrecord"
    outcome = train_candidates(matrix, tfrecord_path=tfrecord if tfrecord.exists() else None, **options)
    save_model(outcome, _sm_path("SM_MODEL_DIR", "model"))
    output = _sm_path("SM_OUTPUT_DATA_DIR", "output/data")
    output.mkdir(parents=True, exist_ok=True)
    outcome.validation_predictions.to_parquet(output / "validation_predictions.parquet", index=False)
    (output / "metrics.json").write_text(json.dumps(outcome.summary(), indent=2))
    for name, metrics in outcome.metrics.items():
        # One line per candidate in a shape that SageMaker metric definitions can match with a regex.
        log.info("%s validation:auc=%.6f validation:log_loss=%.6f", name, metrics["auc"], metrics["log_loss"])
    log.info("chosen model: %s", outcome.chosen)


def _feature_batches(reader: ThreadPoolExecutor, files: list[Path], feature_columns: list[str]):
    """(user ids, float32 feature matrix) per batch of ``files``, read by ``reader`` (one thread: the batches come
    off one iterator, in order) up to READ_AHEAD batches ahead of the caller, starting now: Arrow straight into the
    matrix (a pandas frame of the batch costs more than scoring it)."""
    batches = itertools.chain.from_iterable(
        pq.ParquetFile(path).iter_batches(batch_size=TRANSFORM_BATCH_ROWS, columns=["user_id", *feature_columns])
        for path in files
    )

    def load():
        batch = next(batches, None)
        return None if batch is None else (batch.column("user_id"), feature_array(batch, feature_columns))

    pending = deque(reader.submit(load) for _ in range(READ_AHEAD))

    def loaded():
        while (item := pending.popleft().result()) is not None:
            pending.append(reader.submit(load))
            yield item

    return loaded()


def transform() -> None:
    model_dir = _sm_path("SM_MODEL_DIR", "model")
    source = _sm_path("SM_CHANNEL_INPUT", "input/data/input")
    # is_file: Spark writes datasets as directories named like files (matrix.parquet/part-0000.parquet).
    files = sorted(path for path in source.rglob("*.parquet") if path.is_file())
    if not files:
        raise FileNotFoundError(f"no parquet files under {source}")
    output = _sm_path("SM_OUTPUT_DATA_DIR", "output/data")
    output.mkdir(parents=True, exist_ok=True)
    rows = 0
    with ThreadPoolExecutor(1) as reader, pq.ParquetWriter(output / "scores.parquet", SCORES_SCHEMA) as writer:
        try:
            batches = _feature_batches(reader, files, model_meta(model_dir)["feature_columns"])
            model = model_fn(model_dir)  # while the first batches are read: unpickling the models and importing LiteRT
            for user_ids, X in batches:
                scores = pa.array(model.predict_matrix(X), pa.float64())
                writer.write_batch(pa.RecordBatch.from_arrays([user_ids.cast(pa.string()), scores], schema=SCORES_SCHEMA))
                rows += len(X)
        finally:
            reader.shutdown(cancel_futures=True)  # a failed job does not wait for the reads queued ahead
    log.info("scored %d rows from %d files", rows, len(files))


class _EndpointHandler(BaseHTTPRequestHandler):
    """/ping and /invocations for the model the server holds; a request SageMaker would refuse gets its 4xx."""

    server: "_EndpointServer"

    def do_GET(self) -> None:
        if self.path == "/ping":
            self._reply(200, b"", "text/plain")
        else:
            self._no_route()

    def do_POST(self) -> None:
        if self.path != "/invocations":
            self._no_route()
            return
        self.server.last_request = time.monotonic()
        accept = self.headers.get("Accept") or JSON
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = input_fn(body, self.headers.get("Content-Type") or JSON)
            with self.server.predict_lock:  # one prediction at a time: the models' thread pools already use every core
                prediction = predict_fn(data, self.server.model)
            answer = output_fn(prediction, accept)
        except (ValueError, KeyError) as error:  # a bad length or type, or missing feature columns: the caller's to fix
            self._reply(400, f"{type(error).__name__}: {error}".encode(), "text/plain")
            return
        except Exception as error:  # the server's fault: answer it rather than drop the connection
            log.exception("invocation failed")
            self._reply(500, f"{type(error).__name__}: {error}".encode(), "text/plain")
            return
        self._reply(200, answer.encode() if isinstance(answer, str) else answer, JSON if accept == "*/*" else accept)

    def _no_route(self) -> None:
        self._reply(404, f"no route {self.path}: use GET /ping or POST /invocations".encode(), "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(ENDPOINT_PID_HEADER, str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug(format, *args)


class _EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model):
        super().__init__(address, _EndpointHandler)
        self.model = model
        self.predict_lock = threading.Lock()
        self.last_request = time.monotonic()


def serve() -> None:
    model = model_fn(_sm_path("SM_MODEL_DIR", "model"))
    # One prediction before /ping answers: the models' first call initialises lazily (thread pools, the network's tensors).
    predict_fn(pd.DataFrame({"user_id": ["warm-up"], **{column: [0.0] for column in model.feature_columns}}), model)
    address = (os.environ.get("AUTOML_SERVE_HOST", "0.0.0.0"), int(os.environ.get("SAGEMAKER_BIND_TO_PORT", SERVE_PORT)))
    idle_seconds = float(os.environ.get("AUTOML_SERVE_IDLE_SECONDS", 0))
    with _EndpointServer(address, model) as server:
        if port_file := os.environ.get("AUTOML_SERVE_PORT_FILE"):  # port 0 binds a free port: say which
            Path(f"{port_file}.tmp").write_text(str(server.server_address[1]))
            os.replace(f"{port_file}.tmp", port_file)
        if idle_seconds > 0:

            def stop_when_idle() -> None:
                while time.monotonic() - server.last_request < idle_seconds:
                    time.sleep(min(idle_seconds, 10.0))
                log.info("no invocation for %.0f s: stopping", idle_seconds)
                server.shutdown()

            threading.Thread(target=stop_when_idle, daemon=True).start()
        log.info("serving %s on %s:%d", type(model).__name__, *server.server_address[:2])
        server.serve_forever()


def model_fn(model_dir):
    return load_model(model_dir)


def input_fn(request_body, request_content_type: str) -> pd.DataFrame:
    """JSON (a list of row objects, or an object of columns) or parquet bytes, holding user_id and the features."""
    if request_content_type == JSON:
        return pd.DataFrame(json.loads(request_body))
    if request_content_type == PARQUET:
        return pd.read_parquet(io.BytesIO(request_body))
    raise ValueError(f"unsupported content type {request_content_type!r}: send {JSON} or {PARQUET}")


def predict_fn(input_data: pd.DataFrame, model) -> pd.DataFrame:
    return pd.DataFrame({"user_id": input_data["user_id"].to_numpy(), "raw_score": model.predict(input_data)})


def output_fn(prediction: pd.DataFrame, accept: str):
    if accept in (JSON, "*/*"):
        # pandas writes 10 significant decimals by default, which would round small scores to 0 and tie users.
        return prediction.to_json(orient="records", double_precision=15)
    if accept == PARQUET:
        buffer = io.BytesIO()
        prediction.to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValueError(f"unsupported accept type {accept!r}: ask for {JSON} or {PARQUET}")


MODES = {"train": train, "transform": transform, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Framework containers run the script with only `--name value` hyperparameter arguments: that is training
        # (the values themselves are read from SM_HPS).
        mode = argv[0] if argv and not argv[0].startswith("-") else "train"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {sorted(MODES)}")
        MODES[mode]()
    except Exception as error:
        failure = _sm_path("SM_OUTPUT_DIR", "output") / "failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(f"{type(error).__name__}: {error}\n")  # SageMaker reports this as the job's FailureReason
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    # Nothing is left to collect: spare the interpreter's final collections, which walk every object a job created
    # (0.7 s of TensorFlow's, measured when transforms imported it; training jobs still do).
    gc.freeze()
    sys.exit(status)
