"""End-to-end: prefect.yaml deployed to a real Prefect server, run by a real process worker,
logging to a real MLflow server; every process is started here on 127.0.0.1 and stopped here."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
from conftest import REPO, Processes, free_port, wait_until_up
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.slow
ESCAPED = re.compile(r"\d{8}-\d{6}-escaped-[0-9a-f]{8}")  # the folder of a flow run named ../../escaped


@pytest.fixture
def deployed(tmp_path):
    """Prefect server, MLflow server, work pool, `prefect deploy --all` and a worker."""
    prefect_url = f"http://127.0.0.1:{free_port()}/api"
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": prefect_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PWD": str(REPO),  # the worker is "started from the repository root", as the README says
        # The worker looks for flow runs to start every second, not every 10 s: each of this test's
        # three flow runs would otherwise wait half that, on average, before it starts.
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # Deployment runs may use paths under the test's folder only (not the repository, the default).
        "PIC_ALLOWED_ROOTS": str(tmp_path),
    }
    processes = Processes(tmp_path, env)
    try:
        port = prefect_url.split(":")[2].split("/")[0]
        server, server_log = processes.start(
            "prefect-server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port
        )
        tracking, tracking_log = processes.start(
            "mlflow-server",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            mlflow_url.rsplit(":", 1)[1],
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "mlflow-artifacts"),
        )
        wait_until_up(f"{prefect_url}/health", server, server_log)
        wait_until_up(f"{mlflow_url}/health", tracking, tracking_log)
        processes.run("prefect", "work-pool", "create", "training-pool", "--type", "process")
        processes.run("prefect", "--no-prompt", "deploy", "--all")
        worker, worker_log = processes.start(
            "worker", "prefect", "worker", "start", "--pool", "training-pool"
        )
        yield processes, prefect_url, mlflow_url, worker_log
    finally:
        processes.stop_all()


def start_run(prefect_url: str, name: str, config: dict, run_name: Optional[str] = None) -> FlowRun:
    """A flow run of deployment `name`, created for the worker to pick up; it is not waited for."""
    with temporary_settings({PREFECT_API_URL: prefect_url}):
        return run_deployment(name, parameters={"config": config}, flow_run_name=run_name, timeout=0)


def run_and_wait(
    prefect_url: str, name: str, config: dict, worker_log: Path, run_name: Optional[str] = None
) -> FlowRun:
    return wait_completed(prefect_url, start_run(prefect_url, name, config, run_name), worker_log)


def wait_finished(prefect_url: str, flow_run: FlowRun) -> FlowRun:
    with temporary_settings({PREFECT_API_URL: prefect_url}):
        return asyncio.run(wait_for_flow_run(flow_run.id, timeout=600))


def wait_completed(prefect_url: str, flow_run: FlowRun, worker_log: Path) -> FlowRun:
    finished = wait_finished(prefect_url, flow_run)
    assert finished.state.is_completed(), (
        f"{flow_run.name}: {finished.state}\n{worker_log.read_text()[-5000:]}"
    )
    return finished


async def read_deployment(prefect_url: str, name: str):
    with temporary_settings({PREFECT_API_URL: prefect_url}):
        async with get_client() as client:
            return await client.read_deployment_by_name(name)


def test_deployments_train_and_predict_on_real_servers(deployed, tmp_path):
    processes, prefect_url, mlflow_url, worker_log = deployed
    nightly = asyncio.run(read_deployment(prefect_url, "train-image-classifier/train-nightly"))
    [schedule] = nightly.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    on_demand = asyncio.run(read_deployment(prefect_url, "train-image-classifier/train-on-demand"))
    assert on_demand.schedules == [] and "config" in on_demand.parameter_openapi_schema["properties"]

    folders = {"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "outputs")}
    # The sweep deployment, its trials on a local Dask cluster that the flow run starts and stops. It
    # runs beside the training and prediction below, as two runs of a worker may: in the same data
    # folder and tracking store, for other registered names.
    sweep = asyncio.run(read_deployment(prefect_url, "sweep-image-classifier/sweep"))
    assert sweep.parameters["config"]["grid"] == {"lr": [0.001, 0.003], "model": ["mlp", "cnn"]}
    base = {"dataset": "synthetic", "model": "mlp", "epochs": 1, "registered_model": "swept", **folders}
    sweep_config = {"base": base, "grid": {"lr": [0.001, 0.003]}, "task_runner": "dask", "max_parallel": 2}
    sweeping = start_run(prefect_url, "sweep-image-classifier/sweep", sweep_config)
    # Whoever can reach the API chooses the parameters: a path outside PIC_ALLOWED_ROOTS is refused.
    predict = {"registered_model": "scheduled", "dataset": "synthetic", **folders}
    refused = start_run(prefect_url, "predict-images/predict-batch", {**predict, "output": "/etc/x"})

    # Triggered the way the README says, with custom parameters, watched until it ends.
    config = {"dataset": "synthetic", "model": "mlp", "epochs": 1, "registered_model": "scheduled", **folders}
    watched = processes.run(
        "prefect",
        "deployment",
        "run",
        "train-image-classifier/train-on-demand",
        "--param",
        f"config={json.dumps(config)}",
        "--watch",
        "--watch-timeout",
        "600",
    )
    assert "Completed" in watched, worker_log.read_text()[-5000:]
    client = MlflowClient(tracking_uri=mlflow_url)
    for name in ("scheduled", "scheduled-onnx"):
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    output = tmp_path / "predictions.csv"
    name = "../../escaped"  # the flow run's name becomes its folder's: slugified, inside output_dir
    run_and_wait(
        prefect_url, "predict-images/predict-batch", {**predict, "output": str(output)}, worker_log, name
    )
    table = pd.read_csv(output)
    assert len(table) == 1000 and table["correct"].mean() > 0.5
    [run_dir] = [path for path in Path(folders["output_dir"]).iterdir() if ESCAPED.fullmatch(path.name)]
    assert (run_dir / "config.json").is_file() and not (tmp_path / "escaped").exists()

    failed = wait_finished(prefect_url, refused)
    assert failed.state.is_failed(), failed.state
    assert "ParameterOutsideRootsError: parameter output='/etc/x' resolves to /etc/x" in failed.state.message
    assert f"PIC_ALLOWED_ROOTS={tmp_path}" in failed.state.message

    wait_completed(prefect_url, sweeping, worker_log)
    champion = client.get_model_version_by_alias("swept", "champion")
    parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["trials_finished"] == 2 and parent.data.params["task_runner"] == "dask"
