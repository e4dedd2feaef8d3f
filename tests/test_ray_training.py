"""One training as a Ray Train job on a real Ray cluster (started on 127.0.0.1 by conftest): the
flow's process prepares, evaluates and registers; two Ray workers train."""

import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import EPOCH_METRICS
from mlflow import MlflowClient

from flows.config import TrainConfig
from flows.train_flow import train_flow

pytestmark = pytest.mark.slow


def weights(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(result["run_dir"], "model_weights.pth"), weights_only=True)


def ray_training_processes() -> list[str]:
    """Ray's processes of a training (its controller and workers), on this machine."""
    names = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or ())
        if "RayTrainWorker" in line or "TrainController" in line:
            names.append(line)
    return names


def test_two_processes_here_or_on_ray_train_as_accurate_as_one_and_ray_records_once(
    ray_cluster, prefect_server, mlflow_store
):
    """`--dataset digits` with every other setting at its default: in one process, in two started by
    torch's elastic launcher, and as two Ray Train workers on a Ray cluster."""
    runs = {
        "one process": {},
        "two processes": {"devices": "2"},
        "two Ray workers": {"devices": "2", "train_on": "ray", "address": ray_cluster},
    }
    results = {
        how: train_flow(TrainConfig(dataset="digits", registered_model=f"m{index}", **settings))
        for index, (how, settings) in enumerate(runs.items())
    }
    print({how: result["test_accuracy"] for how, result in results.items()})
    for how in ("two processes", "two Ray workers"):
        assert abs(results["one process"]["test_accuracy"] - results[how]["test_accuracy"]) <= 0.005, how
        assert results[how]["alias"] == "champion" and len(results[how]["versions"]) == 2, how
    local, on_ray = (weights(results[how]) for how in ("two processes", "two Ray workers"))
    assert all(torch.equal(local[key], on_ray[key]) for key in local)  # one training, two launchers
    on_ray = results["two Ray workers"]

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
