"""One training as a Ray Train job on a real Ray cluster (started on 127.0.0.1 by conftest): the
flow's process prepares, evaluates and registers; two Ray workers train."""

import time

import psutil
import pytest
from conftest import EPOCH_METRICS
from mlflow import MlflowClient

from flows.config import TrainConfig
from flows.train_flow import train_flow

pytestmark = pytest.mark.slow


def ray_training_processes() -> list[str]:
    """Ray's processes of a training (its controller and workers), on this machine."""
    names = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or ())
        if "RayTrainWorker" in line or "TrainController" in line:
            names.append(line)
    return names


def test_two_ray_workers_train_one_model_recorded_once_and_as_accurate_as_one_process(
    ray_cluster, prefect_server, mlflow_store
):
    one = train_flow(TrainConfig(dataset="digits", registered_model="one"))
    ray = {"devices": "2", "train_on": "ray", "address": ray_cluster}
    on_ray = train_flow(TrainConfig(dataset="digits", registered_model="ray", **ray))
    print({"one process": one["test_accuracy"], "two Ray workers": on_ray["test_accuracy"]})
    assert abs(one["test_accuracy"] - on_ray["test_accuracy"]) <= 0.005
    assert on_ray["alias"] == "champion" and on_ray["versions"] == {"ray": "1", "ray-onnx": "1"}

    client = MlflowClient()
    run = client.get_run(on_ray["mlflow_run_id"])
    assert run.data.metrics["onnx_top1_agreement"] == 1.0
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3, 4, 5], name
    assert run.data.params["world_size"] == "2" and run.data.tags["train_on"] == "ray"
    deadline = time.monotonic() + 30  # Ray ends its actors' processes shortly after the job
    while ray_training_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_training_processes()
