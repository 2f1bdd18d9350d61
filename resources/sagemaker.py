"""SageMaker: training jobs, batch transforms and endpoints of the project's entry script.

Local mode (the default) runs `automl_assets.core.sagemaker_entry` in a subprocess inside an `/opt/ml`-style tree
under a temporary root, with SageMaker's environment (SM_MODEL_DIR, SM_CHANNEL_<NAME>, SM_OUTPUT_DATA_DIR, SM_HPS and
input/config/hyperparameters.json), so the same script can be submitted to SageMaker unchanged. A local endpoint is
the script's `serve` mode in a process of its own on 127.0.0.1: like a SageMaker endpoint it outlives the run that
deployed it, until it is deleted or stays idle for `endpoint_idle_minutes`."""

import contextlib
import enum
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from automl_assets.core.sagemaker_entry import ENDPOINT_PID_HEADER, PARQUET
from resources.storage import file_lock

ENTRY_MODULE = "automl_assets.core.sagemaker_entry"
PING_ATTEMPTS = 3
DEPLOY_TIMEOUT_SECONDS = 120  # loading a model imports scikit-learn and LiteRT: seconds, not minutes
INVOKE_TIMEOUT_SECONDS = 300
# Tags the daemon puts on the runs a schedule or sensor launches, and on re-executions and retries of a run
# (dagster._core.storage.tags, not public API): a re-execution keeps its parent's tags, a retry adds its number.
AUTOMATION_TAGS = ("dagster/schedule_name", "dagster/sensor_name")
PARENT_RUN_TAG, RETRY_NUMBER_TAG = "dagster/parent_run_id", "dagster/retry_number"


class HourlyEndpoint(enum.Enum):
    """Which hourly (active-user) runs score through a warm endpoint rather than a batch transform."""

    AUTOMATED = "automated"  # runs a schedule or sensor launches: the graph running itself every hour
    ALWAYS = "always"
    NEVER = "never"


class EndpointUnavailable(dg.Failure):
    """The endpoint did not come up, or did not answer a request (stopped, replaced by a deploy of a newer model, or
    hung); not a model that refuses the rows. The caller may score the same rows another way."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str  # http://127.0.0.1:<port>
    pid: int
    started: str  # the process's start time: a recycled pid is not taken for the endpoint
    model_dir: str
    model_version: str  # of the model's files: a model retrained into the same folder is a new one


def _process_start(pid: int) -> str | None:
    """The start time of a running process (None once it has exited or is a zombie); where there is no /proc, only
    whether it runs."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return "running"
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] == "Z" else fields[19]  # proc(5): state is field 3, starttime field 22


def _exited(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid  # reaped: this process had deployed it
    except ChildProcessError:  # another process's child
        return _process_start(pid) is None


def _answers_ping(url: str, pid: int, attempts: int = 1) -> bool:
    """Whether the process `pid` answers /ping with 200 within 2 s at `url`, trying `attempts` times while it times out.
    An endpoint serves one request at a time, so a ping can wait behind another run's request or a busy machine; one
    that refuses the connection, or whose address another process answers, is not tried again."""
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                return response.status == 200 and response.headers.get(ENDPOINT_PID_HEADER) == str(pid)
        except OSError as error:  # urllib wraps a connect timeout in URLError, not a read timeout
            if not isinstance(getattr(error, "reason", error), TimeoutError):
                return False
    return False


def _model_version(model_dir: Path) -> str:
    files = sorted(path for path in model_dir.rglob("*") if path.is_file())
    listing = "".join(f"{path.relative_to(model_dir)}:{path.stat().st_size}:{path.stat().st_mtime_ns};" for path in files)
    return hashlib.sha1(listing.encode()).hexdigest()[:16]


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


@dataclass(frozen=True)
class JobOutput:
    model_dir: Path  # what SageMaker would tar into model.tar.gz
    output_data_dir: Path  # SM_OUTPUT_DATA_DIR: metrics, validation predictions, transform output


class LocalSageMaker(dg.ConfigurableResource):
    """Runs the entry script on this machine with SageMaker's directory and environment conventions."""

    work_root: str = Field(default="", description="Where job trees are made; empty means the system temp folder.")
    keep_job_dirs: bool = Field(default=False, description="Keep each job's /opt/ml tree for debugging.")
    hourly_endpoint: HourlyEndpoint = Field(
        default=HourlyEndpoint.AUTOMATED,
        description="Which hourly (active-user) runs score through a warm endpoint of the prediction's model instead "
        "of a batch transform that loads it every hour: those a schedule or sensor launches (AUTOMATED), all (ALWAYS) "
        "or none (NEVER). Daily runs stay batch transforms.",
    )
    endpoint_idle_minutes: float = Field(
        default=90.0, description="A local endpoint stops itself after this long without an invocation (0: never)."
    )

    def scores_hourly_through_endpoint(self, run_tags: Mapping[str, str]) -> bool:
        """Whether an hourly run with these tags scores through the endpoint. Automated runs come every hour, so a
        warm model pays; a run started by hand leaves no process behind. A re-execution from the UI is started by hand
        (it may be of an older hour, whose model would replace the warm one); the daemon's automatic retry is not."""
        if self.hourly_endpoint is HourlyEndpoint.AUTOMATED:
            by_hand = PARENT_RUN_TAG in run_tags and RETRY_NUMBER_TAG not in run_tags
            return not by_hand and any(tag in run_tags for tag in AUTOMATION_TAGS)
        return self.hourly_endpoint is HourlyEndpoint.ALWAYS

    @contextmanager
    def _job_tree(self, job_name: str) -> Iterator[Path]:
        parent = Path(self.work_root).resolve() if self.work_root else None
        if parent:
            parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"{job_name}-", dir=parent))
        try:
            yield root
        finally:
            if not self.keep_job_dirs:
                shutil.rmtree(root, ignore_errors=True)

    def _run(self, root: Path, command: str, env: dict[str, str], log: Callable[[str], None]) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", ENTRY_MODULE, command],
            env={**os.environ, **env},
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log(line.rstrip())
        if process.wait() != 0:
            failure = root / "output" / "failure"
            reason = failure.read_text().strip() if failure.exists() else "no failure file was written"
            raise dg.Failure(
                description=f"SageMaker {command} job failed (exit {process.returncode}): {reason}",
                metadata={"job_root": str(root)},
            )

    @contextmanager
    def train(
        self, job_name: str, channels: dict[str, Path], hyperparameters: dict, log: Callable[[str], None]
    ) -> Iterator[JobOutput]:
        """A training job; the yielded folders live until the `with` block ends, so copy what you keep."""
        with self._job_tree(job_name) as root:
            config_dir = root / "input" / "config"
            config_dir.mkdir(parents=True)
            # SageMaker hands hyperparameters over as strings; the entry script parses JSON-typed values.
            encoded = {key: json.dumps(value) if not isinstance(value, str) else value for key, value in hyperparameters.items()}
            (config_dir / "hyperparameters.json").write_text(json.dumps(encoded))
            env = {
                "SM_MODEL_DIR": str(root / "model"),
                "SM_OUTPUT_DIR": str(root / "output"),
                "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
                "SM_INPUT_CONFIG_DIR": str(config_dir),
                "SM_HPS": json.dumps(encoded),
                "SM_CHANNELS": json.dumps(sorted(channels)),
            }
            for name, source in channels.items():
                channel = root / "input" / "data" / name
                channel.parent.mkdir(parents=True, exist_ok=True)
                # A symlink stands in for SageMaker's copy from S3: same path layout, no duplicate bytes.
                channel.symlink_to(Path(source).resolve(), target_is_directory=True)
                env[f"SM_CHANNEL_{name.upper()}"] = str(channel)
            for folder in ("model", "output/data"):
                (root / folder).mkdir(parents=True, exist_ok=True)
            self._run(root, "train", env, log)
            yield JobOutput(model_dir=root / "model", output_data_dir=root / "output" / "data")

    @contextmanager
    def transform(self, job_name: str, model_dir: Path, input_dir: Path, log: Callable[[str], None]) -> Iterator[Path]:
        """A batch transform: scores every parquet file of `input_dir`; yields the output folder."""
        with self._job_tree(job_name) as root:
            output = root / "output" / "data"
            output.mkdir(parents=True)
            env = {
                "SM_MODEL_DIR": str(Path(model_dir).resolve()),
                "SM_CHANNEL_INPUT": str(Path(input_dir).resolve()),
                "SM_OUTPUT_DIR": str(root / "output"),
                "SM_OUTPUT_DATA_DIR": str(output),
            }
            self._run(root, "transform", env, log)
            yield output

    def _endpoints_dir(self) -> Path:
        root = Path(self.work_root).resolve() if self.work_root else Path(tempfile.gettempdir(), f"automl-sagemaker-{os.getuid()}")
        return root / "endpoints"

    def _state(self, name: str) -> Endpoint | None:
        """The endpoint `name` as last deployed, if its process still runs."""
        state = self._endpoints_dir() / f"{name}.json"
        try:
            endpoint = Endpoint(**json.loads(state.read_text()))
        except FileNotFoundError:
            return None
        except (TypeError, ValueError):  # unreadable, or written by an older version without the process's identity
            state.unlink(missing_ok=True)
            return None
        if _process_start(endpoint.pid) != endpoint.started:
            return None
        # Without /proc a live pid may be another process's: only one that answers is taken for the endpoint.
        return endpoint if endpoint.started != "running" or _answers_ping(endpoint.url, endpoint.pid) else None

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One deploy or delete of an endpoint name at a time, across processes: parallel hourly runs share it."""
        with file_lock(self._endpoints_dir() / f"{name}.lock"):
            yield

    def describe_endpoint(self, name: str) -> Endpoint | None:
        """The endpoint of that name if it is up (its process runs and answers /ping), else None: also when its address
        answers without naming the endpoint's process, as one started by a version without that header does."""
        endpoint = self._state(name)
        # An endpoint is declared down, and replaced by the next deploy, only after PING_ATTEMPTS pings in a row
        # time out: replacing a busy one would fail the run whose request it is serving.
        return endpoint if endpoint and _answers_ping(endpoint.url, endpoint.pid, PING_ATTEMPTS) else None

    def deploy(self, name: str, model_dir: Path, log: Callable[[str], None]) -> Endpoint:
        """The endpoint `name` serving `model_dir`: the running one when it already serves that model as it is on disk,
        otherwise a new process (replacing the old one), ready when this returns."""
        model_dir = Path(model_dir).resolve()
        version = _model_version(model_dir)
        with self._locked(name):
            running = self.describe_endpoint(name)
            if running and (running.model_dir, running.model_version) == (str(model_dir), version):
                return running
            self._stop(name)
            endpoint = self._start(name, model_dir, version)
        log(f"endpoint {name} serves {model_dir} at {endpoint.url} (pid {endpoint.pid})")
        return endpoint

    def _start(self, name: str, model_dir: Path, version: str) -> Endpoint:
        folder = self._endpoints_dir() / name
        (folder / "output").mkdir(parents=True, exist_ok=True)
        port_file, failure, log_file = folder / "port", folder / "output" / "failure", folder / "endpoint.log"
        port_file.unlink(missing_ok=True)
        failure.unlink(missing_ok=True)
        env = {
            "SM_MODEL_DIR": str(model_dir),
            "SM_OUTPUT_DIR": str(folder / "output"),
            # The server binds a port the system picks and reports it: no window for another process to take it.
            "SAGEMAKER_BIND_TO_PORT": "0",
            "AUTOML_SERVE_PORT_FILE": str(port_file),
            "AUTOML_SERVE_HOST": "127.0.0.1",
            "AUTOML_SERVE_IDLE_SECONDS": str(self.endpoint_idle_minutes * 60),
        }
        # A session of its own: the endpoint outlives the run (and the run's process group) that deploys it.
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", ENTRY_MODULE, "serve"],
            {**os.environ, **env},
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log_file), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        deadline, exited = time.monotonic() + DEPLOY_TIMEOUT_SECONDS, False
        try:
            while not (port_file.exists() and _answers_ping(url := f"http://127.0.0.1:{port_file.read_text()}", pid)):
                exited = _exited(pid)  # reaped: its pid may be another process's from now on
                if exited and failure.exists():  # the script could not serve this model: no other way would
                    raise dg.Failure(f"endpoint {name} did not come up serving {model_dir}: {failure.read_text().strip()}")
                if exited or time.monotonic() > deadline:
                    raise EndpointUnavailable(f"endpoint {name} did not come up serving {model_dir}: see {log_file}")
                time.sleep(0.1)
        except BaseException:
            # Also when the run is terminated meanwhile: no state file names the process yet, so nothing else could
            # stop it before its idle time.
            if not exited:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        started = _process_start(pid)
        if started is None:
            _exited(pid)  # reap it
            raise EndpointUnavailable(f"endpoint {name} exited right after answering /ping: see {log_file}")
        endpoint = Endpoint(name, url, pid, started, str(model_dir), version)
        _write_atomically(self._endpoints_dir() / f"{name}.json", json.dumps(asdict(endpoint)))
        return endpoint

    def invoke(self, endpoint: Endpoint, rows: pd.DataFrame) -> pd.DataFrame:
        """user_id and raw_score for `rows` (user_id and the model's feature columns), sent and answered as parquet."""
        request = urllib.request.Request(
            f"{endpoint.url}/invocations",
            data=rows.to_parquet(index=False),
            headers={"Content-Type": PARQUET, "Accept": PARQUET},
        )
        try:
            with urllib.request.urlopen(request, timeout=INVOKE_TIMEOUT_SECONDS) as response:
                answered_by, body = response.headers.get(ENDPOINT_PID_HEADER), response.read()
        except urllib.error.HTTPError as error:
            raise dg.Failure(f"endpoint {endpoint.name} refused the request ({error.code}): {error.read().decode()}") from error
        except (OSError, http.client.HTTPException) as error:  # refused, reset, cut short or timed out
            log_file = self._endpoints_dir() / endpoint.name / "endpoint.log"
            raise EndpointUnavailable(
                f"endpoint {endpoint.name} at {endpoint.url} did not answer ({error!r}); its log is {log_file}"
            ) from error
        if answered_by != str(endpoint.pid):
            raise EndpointUnavailable(
                f"another process (pid {answered_by}) answered at {endpoint.url}, not endpoint {endpoint.name} (pid "
                f"{endpoint.pid}): it was replaced meanwhile"
            )
        return pd.read_parquet(io.BytesIO(body))

    def delete_endpoint(self, name: str) -> bool:
        """Stops the endpoint, also one that no longer answers; False when none was running."""
        with self._locked(name):
            return self._stop(name)

    def _stop(self, name: str) -> bool:
        endpoint = self._state(name)
        (self._endpoints_dir() / f"{name}.json").unlink(missing_ok=True)
        if endpoint is None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile (idle timeout)
            os.kill(endpoint.pid, signal.SIGTERM)
            os.kill(endpoint.pid, signal.SIGCONT)  # a stopped process takes SIGTERM only once continued
            deadline = time.monotonic() + 10
            while not _exited(endpoint.pid):
                if time.monotonic() > deadline:  # SIGTERM ends the server at once; this is for one stuck in the kernel
                    os.kill(endpoint.pid, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
        return True

    def endpoint_names(self) -> list[str]:
        """Names of the endpoints deployed and not deleted, also those that stopped or no longer answer."""
        folder = self._endpoints_dir()
        return sorted(path.stem for path in folder.glob("*.json")) if folder.exists() else []

    def list_endpoints(self) -> list[Endpoint]:
        """The endpoints that are up."""
        return [endpoint for endpoint in map(self.describe_endpoint, self.endpoint_names()) if endpoint]
