"""End-to-end sweeps: trials as child runs of one parent run, the best registered through the gate."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, prefect_artifacts, run_train_script
from mlflow import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Cancelling

from flows.config import TrainConfig
from flows.recipe import data_shape
from flows.sweep_config import SweepConfig
from flows.sweep_flow import make_trial, publish_best, sweep_flow
from models import build_from_spec
from tasks.data import datasets, local_copy
from tasks.data.datasets import prepare_dataset
from tasks.data.local_copy import DatasetMismatchError
from tasks.data.sources import DigitsSource
from tasks.track import cancellation, tracking
from tasks.train import training
from tasks.train.sweep_steps import TRIAL_WEIGHTS, run_trial
from tasks.train.sweeps import FINISHED, SweepFailedError, trials_table

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
        seeded=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" in result.stderr  # Prefect's own: no PREFECT_API_URL
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


def count_preparations(monkeypatch) -> list[Path]:
    """The data folders a worker prepares data in (the real preparation still runs)."""
    calls, real = [], datasets.prepare_dataset

    def counted(name, data_dir, *args, **options):
        calls.append(data_dir)
        return real(name, data_dir, *args, **options)

    monkeypatch.setattr(local_copy, "prepare_dataset", counted)
    return calls


def as_another_machine(flow_machine: Path, worker: Path, monkeypatch) -> None:
    """From here on this process is a worker on another machine: the flow machine's folder is not
    there (a file stands at its path, so nothing under it can be made), the worker's is its cwd."""
    flow_machine.rename(flow_machine.with_name("flow-machine-away"))
    flow_machine.write_text("not a folder on this machine")
    worker.mkdir()
    monkeypatch.chdir(worker)


def back_on_the_flow_machine(flow_machine: Path, worker: Path, monkeypatch) -> None:
    """And back: the flow machine's folder is there again, the worker's is not."""
    flow_machine.unlink()
    flow_machine.with_name("flow-machine-away").rename(flow_machine)
    worker.rename(worker.with_name("worker-away"))
    monkeypatch.chdir(flow_machine)


def test_trials_on_a_machine_without_the_flows_folders_prepare_the_data_once_and_send_their_weights(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    """Two trials run as a worker on another machine runs them, for real: the flow's prepared file
    and sweep folder are not there, so the worker prepares the data into its own data folder (once),
    trains, and logs its weights to the child run; the flow then registers the winner from those
    weights, the trial's checkpoint being on the worker's disk only."""
    flow_machine, worker = tmp_path / "flow-machine", tmp_path / "worker"
    base = TrainConfig(
        **{"dataset": "digits", "model": "mlp", "epochs": 1, "scheduler": "constant", "batch_size": 256},
        **{"data_dir": "data", "output_dir": "outputs", "experiment": "sweeps", "registered_model": "swept"},
    )
    configs = SweepConfig(base=base, grid={"lr": [0.01, 0.002]}).trial_configs()
    ref = prepare_dataset(DigitsSource(), flow_machine / "data", shape=data_shape(base))  # what the flow does
    trials = [make_trial(index, config, ["lr"], ref) for index, config in enumerate(configs, 1)]
    parent_id = tracking.start_run("sweeps", "sweep", {})
    sweep_dir = flow_machine / "outputs" / "20260101-000000-sweep"

    as_another_machine(flow_machine, worker, monkeypatch)
    preparations = count_preparations(monkeypatch)
    outcomes = [
        {
            "trial": t.index,
            **t.swept,
            "status": FINISHED,
            **run_trial.fn(t, ref, parent_id, sweep_dir, mlflow_store),
        }
        for t in trials
    ]
    assert preparations == [worker / "data"]  # once, for both trials, in the worker's own --data-dir
    assert (worker / "data" / "prepared" / Path(ref.prepared_path).name).is_file()
    for trial, outcome in zip(trials, outcomes):
        assert Path(outcome["checkpoint"]).is_relative_to(worker / "outputs" / sweep_dir.name / trial.name)
        logged = MlflowClient().list_artifacts(outcome["run_id"], "checkpoints")
        assert [artifact.path for artifact in logged] == [TRIAL_WEIGHTS]
    inputs = MlflowClient().get_run(outcomes[0]["run_id"]).inputs.dataset_inputs
    assert {d.dataset.digest[:16] for d in inputs} == {ref.sha256[:16]}  # the flow's data, prepared here
    other = replace(trials[0], index=3, dataset=replace(ref, sha256="0" * 64))
    with pytest.raises(DatasetMismatchError, match=f"{ref.sha256}.*sha256 {'0' * 64}"):
        run_trial.fn(other, other.dataset, parent_id, sweep_dir, mlflow_store)
    assert MlflowClient().get_run(tracking.find_child_run(parent_id, 3)).info.status == "FAILED"

    table = trials_table(outcomes, ["lr"])
    best = outcomes[int(table.sort_values("val_accuracy").iloc[-1].trial) - 1]
    trained = torch.load(best["checkpoint"], weights_only=True)["model"]
    back_on_the_flow_machine(flow_machine, worker, monkeypatch)
    assert not Path(best["checkpoint"]).exists()
    winner, chosen, published = flow(name="publish-best")(publish_best)(trials, outcomes, table, sweep_dir)

    assert chosen["run_id"] == best["run_id"] and published["versions"]
    assert (sweep_dir / winner.name / "checkpoints" / "from-tracking.pt").is_file()  # downloaded
    registered = torch.load(sweep_dir / winner.name / "model_weights.pth", weights_only=True)
    assert registered.keys() == trained.keys() and all(
        torch.equal(registered[k], trained[k]) for k in trained
    )
    model = build_from_spec(winner.spec)
    model.load_state_dict(trained)
    with torch.no_grad():
        predicted = model.eval()(datasets.test_pixels(ref)).argmax(1)
    labels = datasets.load_tensors(ref.prepared_path).test_labels
    assert published["test_accuracy"] == pytest.approx((predicted == labels).float().mean().item())
    champion = MlflowClient().get_model_version_by_alias("swept", "champion")
    assert champion.run_id == best["run_id"]


def test_a_trial_trains_in_two_processes(prefect_server, mlflow_store, tmp_path):
    """--devices 2 in a sweep: each trial is one training in two processes, at most one at a time on
    this 2-core machine (two at once would be refused)."""
    config = sweep(tmp_path, grid={"lr": [0.003]}, max_parallel=1)
    base = config.base.model_copy(update={"devices": "2", "epochs": 1})
    result = sweep_flow(config.model_copy(update={"base": base}))
    parent, [child] = runs_of("sweeps")
    assert child.info.status == "FINISHED" and child.data.params["world_size"] == "2"
    assert child.data.tags["backend"] == "gloo" and result["versions"]
