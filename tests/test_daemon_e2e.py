"""A user's view: the Dagster webserver and daemon on 127.0.0.1 run the graph by themselves.

Raw files are dropped under landing/, then a spec into the watched folder; with no other action, the sensors ingest,
register, train and score. A file of the next hour is then ingested and its active users scored through the
prediction's warm endpoint, as every hour of a running system. Then a backfill launched over GraphQL (as the UI does)
completes in one run."""

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import requests

from automl_assets.core.synthetic import SyntheticConfig, generate_events, write_amplitude_export
from automl_assets.core.timewin import HOUR
from automl_assets.predictions import SCOPE_TAG
from automl_assets.runs import RANGE_END_TAG, RANGE_START_TAG
from resources.sagemaker import LocalSageMaker
from tests.conftest import utc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
END = utc(2026, 3, 2)
LANDING = Path("store", "landing", "synthetic")
FIRST_SCORED = "2026-03-01-23:00|buy_7d"  # the newest stored hour when the spec is registered
SPEC = """name: buy_7d
outcome:
  event: purchase
horizon: 7d
cohort:
  active_within: 14d
lookback_weeks: 2
models: [logistic_regression, hist_gradient_boosting]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Its own process group with default signal handlers, so that stopping it stops everything it started.
    def restore_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)

    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=restore_signals)


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Dagster:
    def __init__(self, url: str):
        self.url = url

    def query(self, text: str, **variables) -> dict:
        response = requests.post(self.url, json={"query": text, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def launch(self, job: str, tags: dict[str, str]) -> str:
        """Launch a run of `job` as the launchpad does; the daemon's queue decides when it starts."""
        data = self.query(
            "mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) { __typename "
            "... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }",
            p={
                "selector": {"repositoryLocationName": "automl", "repositoryName": "__repository__", "pipelineName": job},
                "runConfigData": {},
                "executionMetadata": {"tags": [{"key": key, "value": value} for key, value in tags.items()]},
            },
        )["launchPipelineExecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def run_times(self, run_ids: list[str]) -> dict[str, tuple[str, float | None, float | None]]:
        """Each run's status, start and end time."""
        data = self.query(
            "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status startTime endTime } } } }",
            f={"runIds": run_ids},
        )
        return {run["runId"]: (run["status"], run["startTime"], run["endTime"]) for run in data["runsOrError"]["results"]}

    def runs(self, job: str) -> list[dict]:
        data = self.query(
            "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results { runId status tags { key value } } } } }",
            f={"pipelineName": job},
        )
        return data["runsOrError"]["results"]

    def materialised_partitions(self, asset: str) -> set[str]:
        data = self.query(
            "query($k: AssetKeyInput!) { assetOrError(assetKey: $k) { ... on Asset { assetMaterializations(limit: 1000) { partition } } } }",
            k={"path": [asset]},
        )
        found = data["assetOrError"].get("assetMaterializations") or []
        return {m["partition"] for m in found}

    def text_metadata(self, asset: str, partition: str, label: str) -> list[str]:
        """The text metadata entry `label` of each materialisation of the asset's partition."""
        data = self.query(
            "query($k: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $k) { ... on Asset { "
            "assetMaterializations(partitions: $p) { metadataEntries { label ... on TextMetadataEntry { text } } } } } }",
            k={"path": [asset]},
            p=[partition],
        )
        found = data["assetOrError"].get("assetMaterializations") or []
        return [entry["text"] for m in found for entry in m["metadataEntries"] if entry["label"] == label]


def wait_for(what: str, condition, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(3)
    tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-4000:] for log in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def dagster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    home, store, specs = tmp / "dagster_home", tmp / "store", tmp / "specs"
    for folder in (home, store, specs):
        folder.mkdir()
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home)  # the instance settings the project ships
    for chunk in generate_events(SyntheticConfig(n_users=5000, end=END, weeks=3, seed=3)):
        write_amplitude_export(chunk, tmp / LANDING)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "AUTOML_STORAGE_ROOT": str(store),
        "AUTOML_SPECS_DIR": str(specs),
        "AUTOML_SAGEMAKER_ROOT": str(tmp / "sagemaker"),
        "AUTOML_HOURLY_ENDPOINT": "automated",  # the default, whatever the shell running the tests set
    }
    port = free_port()
    logs = [tmp / "webserver.log", tmp / "daemon.log"]
    webserver = start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"], env, logs[0])
    daemon = None
    try:
        client = Dagster(f"http://127.0.0.1:{port}/graphql")

        def up():
            try:
                return client.query("{ version }")
            except requests.RequestException:
                return None

        # The daemon starts once the webserver has created the instance's database: both creating it at once race.
        wait_for("the webserver", up, 120, logs)
        daemon = start([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], env, logs[1])
        yield client, tmp, logs
    finally:
        if daemon is not None:
            stop(daemon)
        stop(webserver)
        # Hourly runs the sensors launch score through endpoints that outlive them: stop any that were deployed.
        sagemaker = LocalSageMaker(work_root=env["AUTOML_SAGEMAKER_ROOT"])
        for name in sagemaker.endpoint_names():
            sagemaker.delete_endpoint(name)


def test_sensors_ingest_register_train_and_score_without_any_other_action(dagster):
    client, tmp, logs = dagster

    def ingested():
        return any(run["status"] == "SUCCESS" for run in client.runs("event_store_job"))

    wait_for("the new-data sensor's ingest run", ingested, 600, logs)
    (tmp / "specs" / "buy_7d.yaml").write_text(SPEC)
    wait_for("scores of the new prediction", lambda: FIRST_SCORED in client.materialised_partitions("scores"), 900, logs)
    assert FIRST_SCORED in client.materialised_partitions("model")
    assert FIRST_SCORED in client.materialised_partitions("calibrator")


def test_the_next_hours_active_users_are_scored_through_the_warm_endpoint(dagster):
    client, tmp, logs = dagster
    assert FIRST_SCORED in client.materialised_partitions("scores"), "needs the test before: it trains buy_7d"
    generated = pa.concat_tables(generate_events(SyntheticConfig(n_users=5000, end=END + HOUR, weeks=1, seed=3)))
    next_hour = generated.filter(pc.greater_equal(generated["event_time"], pa.scalar(END, generated.schema.field("event_time").type)))
    assert next_hour.num_rows > 0
    write_amplitude_export(next_hour, tmp / LANDING)
    partition = "2026-03-02-00:00|buy_7d"
    # The new-data sensor ingests the hour; score_after_ingest then scores its active users (no retrain is due).
    wait_for("hourly scores of the new hour", lambda: partition in client.materialised_partitions("scores"), 600, logs)
    # Every materialisation of the hour (a drift retrain may add one) is hourly and scored by the endpoint.
    assert set(client.text_metadata("scores", partition, "scope")) == {"active"}
    assert set(client.text_metadata("scores", partition, "scored_by")) == {"endpoint automl-buy-7d"}
    assert LocalSageMaker(work_root=str(tmp / "sagemaker")).describe_endpoint("automl-buy-7d") is not None


def test_a_backfill_launched_like_the_ui_completes_in_one_run(dagster):
    client, _, logs = dagster
    hours = ["2026-02-20-00:00", "2026-02-20-01:00", "2026-02-20-02:00", "2026-02-20-03:00"]
    launched = client.query(
        "mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename "
        "... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }",
        p={"partitionNames": hours, "assetSelection": [{"path": ["events"]}, {"path": ["hourly_rollups"]}]},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def finished():
        data = client.query(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }",
            id=backfill_id,
        )
        status = data["partitionBackfillOrError"]["status"]
        return status if status in ("COMPLETED", "COMPLETED_SUCCESS", "FAILED", "COMPLETED_FAILED") else None

    assert wait_for("the backfill", finished, 600, logs) in ("COMPLETED", "COMPLETED_SUCCESS")
    backfill_runs = [
        run for job in ("event_store_job", "__ASSET_JOB") for run in client.runs(job)
        if any(tag["key"] == "dagster/backfill" and tag["value"] == backfill_id for tag in run["tags"])
    ]
    assert len(backfill_runs) == 1  # four hours of two assets: one run, one Spark job per rollup kind


def test_the_run_queue_keeps_runs_that_write_the_same_files_apart(dagster):
    """The shipped dagster.yaml: two runs of one (hour, prediction) partition, and two event-store runs, launched at
    once, run one after the other."""
    client, _, logs = dagster
    hour, prediction = FIRST_SCORED.split("|")
    partition_tags = {"dagster/partition": FIRST_SCORED, "dagster/partition/hour": hour, "dagster/partition/prediction": prediction}
    scoring = [client.launch("scoring_job", {**partition_tags, SCOPE_TAG: "active"}) for _ in range(2)]
    ingest_hours = ["2026-02-21-00:00", "2026-02-21-01:00"]
    ingests = [
        client.launch("event_store_job", {RANGE_START_TAG: key, RANGE_END_TAG: key})
        for key in ingest_hours
    ]

    def all_done():
        times = client.run_times(scoring + ingests)
        return times if all(status in ("SUCCESS", "FAILURE", "CANCELED") for status, _, _ in times.values()) else None

    times = wait_for("the four runs", all_done, 600, logs)
    assert {status for status, _, _ in times.values()} == {"SUCCESS"}, times
    for pair in (scoring, ingests):
        first, second = sorted((times[run_id][1:] for run_id in pair))
        assert second[0] >= first[1], f"the runs overlapped: {first} and {second}"
