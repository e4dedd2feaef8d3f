"""End-to-end sweeps: trials as child runs of one parent run, the best registered through the gate."""

from __future__ import annotations

import json
import os
import socket

import pandas as pd
import pytest
from conftest import REPO, prefect_artifacts, run_train_script
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Cancelling

from flows.config import TrainConfig
from flows.sweep_config import SweepConfig
from flows.sweep_flow import sweep_flow
from tasks.track import cancellation
from tasks.train import training
from tasks.train.sweeps import SweepFailedError

pytestmark = pytest.mark.slow
SWEEP_SCRIPT = REPO / "flows" / "sweep_flow.py"


def runs_of(experiment: str) -> tuple[object, list]:
    """The experiment's one parent run and its child runs, by trial."""
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, sorted(children, key=lambda run: int(run.data.tags["sweep.trial"]))


def best_of(children: list) -> object:
    return max(children, key=lambda run: (run.data.metrics["val_accuracy"], -run.data.metrics["val_loss"]))


def test_script_sweeps_a_grid_and_registers_the_best_child_run(tmp_path):
    result = run_train_script(
        tmp_path,
        *("--dataset", "digits", "--epochs", "2", "--grid", "image-size=20,28", "--grid", "model=mlp,cnn"),
        *("--registered-model", "digits-sweep"),
        script=SWEEP_SCRIPT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" not in result.stderr  # the early one served it
    assert "best of 4 trials" in result.stdout

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        client = MlflowClient()
        parent, children = runs_of("image-classifier")
        assert len(children) == 4 and all(run.info.status == "FINISHED" for run in children)
        swept = [(run.data.params["image_size"], run.data.params["model"]) for run in children]
        assert swept == [("20", "mlp"), ("20", "cnn"), ("28", "mlp"), ("28", "cnn")]
        # The data was prepared once per image size, and each trial trained on its own.
        assert len(list((tmp_path / "data" / "prepared").glob("digits-*.safetensors"))) == 2
        digests = {
            run.data.params["image_size"]: {d.dataset.digest for d in run.inputs.dataset_inputs}
            for run in children
        }
        assert digests["20"].isdisjoint(digests["28"])
        worker = f"{socket.gethostname()}:"
        assert all(run.data.tags["worker"].startswith(worker) for run in children)
        best = best_of(children)
        champion = client.get_model_version_by_alias("digits-sweep", "champion")
        assert champion.run_id == best.info.run_id == parent.data.tags["best_run_id"]
        size = int(best.data.params["image_size"])
        assert f"{size}x{size} pixels" in champion.description  # the winner's own preprocessing
        assert client.get_model_version_by_alias("digits-sweep-onnx", "champion").run_id == best.info.run_id
        assert "test_accuracy" in best.data.metrics and "onnx_max_abs_diff" in best.data.metrics
        assert parent.data.metrics["trials_finished"] == 4 and parent.info.status == "FINISHED"
        artefacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"trials.csv", "val_accuracy_by_setting.png", "config.json"} <= artefacts
        assert len(client.search_registered_models()) == 2  # one registration per sweep, two flavors
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def sweep(tmp_path, **fields) -> SweepConfig:
    base = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=2,
        scheduler="constant",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "outputs"),
        experiment="sweeps",
        registered_model="swept",
    )
    return SweepConfig(base=base, **fields)


def fail_trials(monkeypatch, once: float, always: float) -> dict[float, int]:
    """Trials with learning rate `once` crash in their second epoch on the first attempt only;
    those with `always` crash every time. Returns epochs started per learning rate."""
    real = training.train_one_epoch
    started: dict[float, int] = {}

    def flaky(model, loader, optimisation, *rest):
        lr = optimisation.optimizer.defaults["lr"]
        started[lr] = started.get(lr, 0) + 1
        if lr == always or (lr == once and started[lr] == 2):
            raise RuntimeError(f"simulated crash at lr={lr}")
        return real(model, loader, optimisation, *rest)

    monkeypatch.setattr(training, "train_one_epoch", flaky)
    return started


def test_a_failing_trial_is_retried_from_its_checkpoint_and_one_that_keeps_failing_is_reported(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    started = fail_trials(monkeypatch, once=0.002, always=0.003)
    result = sweep_flow(sweep(tmp_path, grid={"lr": [0.001, 0.002, 0.003]}, max_parallel=2))

    assert started[0.002] == 3  # epoch 1, epoch 2 crashes, the retry resumes at epoch 2
    table = pd.DataFrame(result["trials"]).set_index("trial")
    assert table["status"].tolist() == ["finished", "finished", "failed"]
    assert "simulated crash at lr=0.003" in table.loc[3, "error"]
    parent, children = runs_of("sweeps")
    assert parent.info.status == "FINISHED"
    assert [run.info.status for run in children] == ["FINISHED", "FINISHED", "FAILED"]
    history = MlflowClient().get_metric_history(children[1].info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert result["best_run_id"] in {children[0].info.run_id, children[1].info.run_id}
    csv = pd.read_csv(os.path.join(result["run_dir"], "trials.csv"))
    assert csv["status"].tolist() == ["finished", "finished", "failed"]
    [artifact] = [a for a in prefect_artifacts(key="sweep-swept") if a.type == "table"]
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["status"] for row in rows] == ["finished", "finished", "failed"] and rows[2][
        "val_accuracy"
    ] is None


def test_a_sweep_whose_trials_all_fail_fails_and_registers_nothing(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    fail_trials(monkeypatch, once=-1, always=0.003)
    with pytest.raises(SweepFailedError, match="all 1 trials failed: trial 1: RuntimeError: simulated crash"):
        sweep_flow(sweep(tmp_path, grid={"lr": [0.003]}))
    parent, [child] = runs_of("sweeps")
    assert parent.info.status == "FAILED" and child.info.status == "FAILED"
    assert MlflowClient().search_registered_models() == []


def test_a_sweep_cancelled_in_prefect_stops_its_trials_and_registers_nothing(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    """Cancelled as from the UI, the CLI or the API, with no worker to stop its process, after the
    first trial's first epoch: that trial stops at its next check, no other trial starts, nothing
    is registered, and the parent and child runs end KILLED."""
    monkeypatch.setattr(cancellation, "CHECK_EVERY_SECONDS", 0)  # check at every batch: no timing
    real, started = training.train_one_epoch, []

    def then_cancel(model, loader, optimisation, *rest):
        started.append(optimisation.optimizer.defaults["lr"])
        metrics = real(model, loader, optimisation, *rest)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        return metrics

    monkeypatch.setattr(training, "train_one_epoch", then_cancel)
    config = sweep(tmp_path, grid={"lr": [0.001, 0.002, 0.003]}, max_parallel=1)
    state = sweep_flow(config, return_state=True)

    assert state.is_cancelled() and "was cancelled in Prefect" in state.message
    assert started == [0.001, 0.001]  # epoch 2 stopped at its first batch; trials 2 and 3 never began
    parent, [child] = runs_of("sweeps")
    assert parent.info.status == "KILLED" and child.info.status == "KILLED"
    assert child.data.params["lr"] == "0.001" and "trials_finished" not in parent.data.metrics
    history = MlflowClient().get_metric_history(child.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    assert MlflowClient().search_registered_models() == []


def trial_workers(experiment: str) -> set[str]:
    _, children = runs_of(experiment)
    return {run.data.tags["worker"] for run in children}


def test_dask_sweep_trains_in_both_worker_processes(dask_cluster, prefect_server, mlflow_store, tmp_path):
    grid = {"lr": [0.001, 0.002, 0.003, 0.004]}
    config = sweep(tmp_path, grid=grid, task_runner="dask", address=dask_cluster)
    result = sweep_flow(config)

    workers = trial_workers("sweeps")
    assert len(workers) == 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers
    parent, children = runs_of("sweeps")
    assert len(children) == 4 and all("val_accuracy" in run.data.metrics for run in children)
    champion = MlflowClient().get_model_version_by_alias("swept", "champion")
    assert champion.run_id == best_of(children).info.run_id == result["best_run_id"]


def test_ray_sweep_trains_in_ray_worker_processes(ray_cluster, prefect_server, mlflow_store, tmp_path):
    grid = {"lr": [0.001, 0.002, 0.003, 0.004]}
    config = sweep(tmp_path, grid=grid, task_runner="ray", address=ray_cluster)
    result = sweep_flow(config)

    workers = trial_workers("sweeps")
    assert len(workers) >= 2 and f"{socket.gethostname()}:{os.getpid()}" not in workers
    assert MlflowClient().get_model_version_by_alias("swept", "champion").run_id == result["best_run_id"]
