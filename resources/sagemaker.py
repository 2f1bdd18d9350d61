"""SageMaker: training jobs and batch transforms of the project's entry script.

Local mode (the default) runs `automl_assets.core.sagemaker_entry` in a subprocess inside an `/opt/ml`-style tree
under a temporary root, with SageMaker's environment (SM_MODEL_DIR, SM_CHANNEL_<NAME>, SM_OUTPUT_DATA_DIR, SM_HPS and
input/config/hyperparameters.json), so the same script can be submitted to SageMaker unchanged."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

ENTRY_MODULE = "automl_assets.core.sagemaker_entry"


@dataclass(frozen=True)
class JobOutput:
    model_dir: Path  # what SageMaker would tar into model.tar.gz
    output_data_dir: Path  # SM_OUTPUT_DATA_DIR: metrics, validation predictions, transform output


class LocalSageMaker(dg.ConfigurableResource):
    """Runs the entry script on this machine with SageMaker's directory and environment conventions."""

    work_root: str = Field(default="", description="Where job trees are made; empty means the system temp folder.")
    keep_job_dirs: bool = Field(default=False, description="Keep each job's /opt/ml tree for debugging.")

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
