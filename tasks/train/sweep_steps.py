"""Prefect tasks of the sweep flow: one trial wherever the task runner puts it, and the report.

A trial needs no folder shared with the flow: it reads the prepared data where its machine has it
(tasks.data.local_copy), writes its checkpoints where it can, and sends its final weights to its
child run, from which the flow takes the winner's when the trial's checkpoint is not on its disk."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from common.files import atomic_output, atomic_save
from common.retrying import retry_except
from models import ModelSpec
from tasks.data.datasets import DatasetRef
from tasks.data.loaders import make_loaders
from tasks.data.local_copy import CannotPrepareHereError, DataRecipe, DatasetMismatchError, dataset_here
from tasks.track import lineage, reports, tracking
from tasks.track.cancellation import CancelWatch, FlowRunCancelled, ended_status
from tasks.track.delivery import run_logger
from tasks.train import checkpoints, sweeps
from tasks.train.launch import resolve_devices
from tasks.train.parallel import Parallel
from tasks.train.steps import TrainedModel, Watch, train_logged
from tasks.train.training import TrainSettings, resolve_device


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep: what it varies and all it needs to train, small enough to ship."""

    index: int
    swept: dict[str, object]
    params: dict[str, object]  # the trial's whole TrainConfig, logged as its child run's params
    spec: ModelSpec
    settings: TrainSettings
    batch_size: int
    val_fraction: float
    device: str
    dataset: DatasetRef  # prepared in the preprocessing this trial asks for
    recipe: DataRecipe  # how a worker that does not see dataset.prepared_path prepares it
    augment: str = "none"

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


TRIAL_WEIGHTS = "checkpoints/model_weights.pth"  # a trial's final state_dict, in its child run


def worker_name() -> str:
    """<hostname>:<pid> of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@task(
    name="train-trial",
    task_run_name="trial-{trial.index}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=retry_except(FlowRunCancelled, DatasetMismatchError, CannotPrepareHereError),
)
def run_trial(
    trial: Trial, dataset: DatasetRef, parent_run_id: str, sweep_dir: Path, tracking_uri: str
) -> dict:
    """Trains one trial in its own child MLflow run and logs its final weights there; a retry on the
    same machine resumes from its last checkpoint. Once the sweep's flow run is cancelled in
    Prefect, a trial not yet started does not start, and one training stops at its next check (its
    child run KILLED)."""
    CancelWatch(interval=0)()  # the runner may start it long after the sweep was cancelled
    tracking.use_tracking_uri(tracking_uri)
    device = resolve_device(trial.device)
    tags = {"worker": worker_name(), "device": str(device), "torch_version": torch.__version__}
    label = ",".join(f"{key}={value}" for key, value in trial.swept.items())
    run_id = tracking.open_child_run(parent_run_id, trial.index, f"{trial.name} {label}", tags, trial.params)
    try:
        dataset = dataset_here(dataset, trial.recipe, run_logger())
        lineage.log_splits(run_id, dataset, trial.settings.seed, trial.val_fraction)
        seed = trial.settings.seed
        loaders = make_loaders(dataset, trial.batch_size, trial.val_fraction, seed, device, trial.augment)
        watch = Watch(system_metrics=trial.params["system_metrics"], stop_when_cancelled=True)
        folder = trial_folder(sweep_dir, trial.name, str(trial.params["output_dir"]))
        devices = resolve_devices(str(trial.params["devices"]), device)
        timeout = float(trial.params["collective_timeout_seconds"])
        parallel = Parallel(devices, dataset, trial.val_fraction, timeout_seconds=timeout)
        trained = train_logged(trial.spec, loaders, trial.settings, folder, run_id, watch, parallel)
        weights = checkpoints.write_state_dict(trained.weights(), folder / TRIAL_WEIGHTS)
        tracking.log_artifacts(run_id, [weights], str(Path(TRIAL_WEIGHTS).parent))
    except BaseException as error:
        tracking.finish_run(run_id, ended_status(error))
        raise
    tracking.finish_run(run_id, "FINISHED")
    last = trained.history[-1]
    return {
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "train_accuracy": last["train_accuracy"],
        "train_loss": last["train_loss"],
        "epochs": len(trained.history),
        "train_seconds": sum(epoch["epoch_seconds"] for epoch in trained.history),
        "worker": tags["worker"],
        "run_id": run_id,
        "checkpoint": trained.checkpoint_path,
        "history": trained.history,
    }


def trial_folder(sweep_dir: Path, name: str, output_dir: str) -> Path:
    """The trial's folder: in the sweep's when this machine can write there (the flow's machine, or
    a shared folder); else in the sweep's --output-dir resolved in this worker's working directory
    (for a path from another machine that is absent or read-only here), else in ./outputs."""
    here = [Path(output_dir).expanduser().resolve(), Path.cwd() / "outputs"]
    candidates = dict.fromkeys([sweep_dir / name, *(root / sweep_dir.name / name for root in here)])
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    raise PermissionError(f"{worker_name()} can write in none of {', '.join(map(str, candidates))}")


@task(name="fetch-trial-weights", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def fetch_trial_weights(run_id: str, folder: Path) -> Path:
    """Downloads a trial's final weights from its child run (through the tracking server: with an
    HTTP store, its artefact proxy) into `folder`, as the `model` entry TrainedModel reads."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        downloaded = tracking.get_client().download_artifacts(run_id, TRIAL_WEIGHTS, scratch)
        weights = checkpoints.load_weights(Path(downloaded))  # weights_only: no pickled code runs
    path = folder / "checkpoints" / "from-tracking.pt"
    atomic_save({"model": weights}, path)
    return path


def trained_here(trial: Trial, outcome: dict, folder: Path) -> TrainedModel:
    """A finished trial's model on this machine: from the checkpoint where the trial left it when
    this machine sees that path, else from the weights in its child run, downloaded into `folder`."""
    checkpoint = Path(outcome["checkpoint"])
    if not checkpoint.is_file():
        print(f"{checkpoint} is not on this machine; taking {trial.name}'s weights from its MLflow run")
        checkpoint = fetch_trial_weights(outcome["run_id"], folder)
    return TrainedModel(trial.spec, str(checkpoint), outcome["history"])


@task(name="report-trials", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def report_trials(
    outcomes: Sequence[dict], swept: Sequence[str], sweep_dir: Path, run_id: str, key: str
) -> pd.DataFrame:
    """Logs the trial table (CSV and Prefect table artifact), the accuracy plot and the best trial
    to the parent run."""
    table = sweeps.trials_table(outcomes, swept)
    csv = sweep_dir / "trials.csv"
    with atomic_output(csv) as handle:
        table.to_csv(handle, index=False)
    plot = sweeps.plot_by_setting(table, swept, sweep_dir / "val_accuracy_by_setting.png")
    tracking.log_artifacts(run_id, [csv] + ([plot] if plot else []))
    finished = int((table["status"] == sweeps.FINISHED).sum())
    tracking.log_metrics(run_id, {"trials_finished": finished, "trials_failed": len(table) - finished})
    if finished:
        best = sweeps.best_trial(table)
        tracking.log_metrics(run_id, {"best_val_accuracy": best.val_accuracy, "best_val_loss": best.val_loss})
        tracking.log_tags(run_id, {"best_trial": best.trial, "best_run_id": best.run_id})
    rows = [  # 4 decimals are plenty to read; the CSV keeps every digit
        {
            name: None if isinstance(value, float) and math.isnan(value) else value
            for name, value in row.items()
        }
        for row in table.round(4).to_dict("records")
    ]
    create_table_artifact(
        rows,
        key=reports.artifact_key("sweep", key),
        description=f"{finished} of {len(table)} trials finished; MLflow parent run {run_id}",
    )
    print(table.drop(columns=["run_id", "error"]).to_string(index=False))
    return table
