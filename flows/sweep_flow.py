"""Hyperparameter sweep: trials train in parallel (threads, processes, Dask or Ray) as child MLflow
runs of one parent run; the best is tested, exported, validated and registered like train_flow's.

`python flows/sweep_flow.py FLAGS` runs it once, as flows/train_flow.py does its flow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.futures import PrefectFuture
from prefect.states import Cancelled
from prefect.task_runners import TaskRunner

from common.path_settings import resolve_path
from flows.cli import prepare_servers, user_errors_exit
from flows.config import TrainConfig
from flows.confinement import check_confined
from flows.recipe import data_shape, model_spec, train_settings
from flows.runners import make_task_runner, running, submit_all
from flows.sweep_config import SweepConfig, check_machine_fits, parse_sweep_config
from tasks.data.augment import resolve_augment
from tasks.data.datasets import DatasetRef, Shape
from tasks.data.loaders import make_test_loader
from tasks.data.local_copy import DataRecipe
from tasks.data.steps import fetch_dataset, fetch_weights
from tasks.publish.gate_lock import require_shared_prefect
from tasks.publish.stage import publish_model
from tasks.track import tracking
from tasks.track.cancellation import CancelWatch, FlowRunCancelled
from tasks.track.steps import log_dataset, make_run_dir, mlflow_run
from tasks.train.speed import resolve_precision
from tasks.train.sweep_steps import Trial, report_trials, run_trial, trained_here
from tasks.train.sweeps import FAILED, FINISHED, best_trial
from tasks.train.training import resolve_device


@flow(name="sweep-image-classifier", log_prints=True)
def sweep_flow(config: SweepConfig) -> dict:
    """Prepare the data once, train every trial, then publish the best one through the champion gate."""
    check_confined(config)
    require_shared_prefect()  # a tracking server's gate needs the team's Prefect server: refuse now
    check_machine_fits(config)
    base = config.base
    runner = make_task_runner(config.task_runner, config.address, config.max_parallel)
    sweep_dir = make_run_dir(resolve_path(base.output_dir))
    params = {**base.model_dump(), **config.model_dump(exclude={"base"})}
    try:
        with mlflow_run(base.experiment, params, base.device, sweep_dir) as parent_id:
            configs = config.trial_configs()
            for model in sorted({trial.model for trial in configs if trial.weights == "imagenet"}):
                fetch_weights(model)  # before any data work: offline, it fails in seconds
            datasets = prepare_shapes(base, {data_shape(trial) for trial in configs})
            for dataset in datasets.values():
                log_dataset(parent_id, dataset)
            stop_if_cancelled = CancelWatch(interval=0)
            stop_if_cancelled()
            trials = [
                make_trial(index, trial_config, config.swept_fields, datasets[data_shape(trial_config)])
                for index, trial_config in enumerate(configs, 1)
            ]
            outcomes = run_trials(runner, trials, parent_id, sweep_dir, config)
            stop_if_cancelled()  # its trials stopped at their next check: nothing is registered
            key = base.registered_model or base.dataset.name
            table = report_trials(outcomes, config.swept_fields, sweep_dir, parent_id, key)
            stop_if_cancelled()
            winner, best, published = publish_best(trials, outcomes, table, sweep_dir)
    except FlowRunCancelled as cancelled:  # the parent and running child runs ended KILLED
        return Cancelled(message=str(cancelled))  # what Prefect asked for: the run ends Cancelled
    return {
        "mlflow_run_id": parent_id,
        "run_dir": str(sweep_dir),
        "trials": table.to_dict("records"),
        "best_trial": winner.index,
        "best_run_id": best["run_id"],
        "best_settings": winner.swept,
        **published,
    }


def publish_best(
    trials: list[Trial], outcomes: list[dict], table: pd.DataFrame, sweep_dir: Path
) -> tuple[Trial, dict, dict]:
    """Tests, exports, checks and registers the best trial's model as train_flow does its one (its
    weights from its MLflow run when it trained on another machine); returns the winning trial, its
    outcome and what publishing it gave."""
    best = outcomes[int(best_trial(table).trial) - 1]
    winner = trials[best["trial"] - 1]
    trained = trained_here(winner, best, sweep_dir / winner.name)
    name = TrainConfig(**winner.params).model_name
    test = make_test_loader(winner.dataset, "cpu")
    published = publish_model(
        trained, test, winner.dataset, name, winner.params, sweep_dir / winner.name, best["run_id"]
    )
    return winner, best, published


def prepare_shapes(base: TrainConfig, shapes: set[Shape]) -> dict[Shape, DatasetRef]:
    """The sweep's data once per preprocessing its trials ask for (image size, and the default size
    that pretrained weights change)."""
    data_dir = resolve_path(base.data_dir)
    return {
        shape: fetch_dataset(base.dataset, data_dir, shape, base.prepare_workers)
        for shape in sorted(shapes, key=repr)
    }


def make_trial(index: int, config: TrainConfig, swept: list[str], dataset: DatasetRef) -> Trial:
    return Trial(
        index=index,
        swept={name: getattr(config, name) for name in swept},
        params=config.model_dump(),
        spec=model_spec(config, dataset),
        settings=train_settings(config),
        batch_size=config.batch_size,
        val_fraction=config.val_fraction,
        device=config.device,
        dataset=dataset,
        recipe=data_recipe(config),
        augment=resolve_augment(config.augment, config.dataset, dataset.channels),
    )


def data_recipe(config: TrainConfig) -> DataRecipe:
    """How a worker that does not see the flow's prepared file prepares the same data: the source
    and data folder as given, so a relative path means the worker's own working directory."""
    return DataRecipe(config.dataset, config.data_dir, data_shape(config), config.prepare_workers)


def run_trials(
    runner: TaskRunner,
    trials: list[Trial],
    parent_id: str,
    sweep_dir: Path,
    config: SweepConfig,
) -> list[dict]:
    """Every trial on the runner, at most max_parallel at once; one outcome each, failures included."""
    base = config.base
    timeout = base.train_timeout_minutes and base.train_timeout_minutes * 60
    task = run_trial.with_options(retries=base.train_retries, retry_delay_seconds=2, timeout_seconds=timeout)
    uri = tracking.tracking_uri()
    calls = [
        dict(trial=t, dataset=t.dataset, parent_run_id=parent_id, sweep_dir=sweep_dir, tracking_uri=uri)
        for t in trials
    ]
    with running(runner):
        futures = submit_all(runner, task, calls, config.max_parallel)
        return [outcome(trial, future, parent_id) for trial, future in zip(trials, futures)]


def outcome(trial: Trial, future: PrefectFuture, parent_id: str) -> dict:
    """The trial's result, or why it failed after its retries (which does not stop the sweep)."""
    row = {"trial": trial.index, **trial.swept}
    try:
        return {**row, "status": FINISHED, **future.result()}
    except Exception as error:
        print(f"{trial.name} failed: {type(error).__name__}: {error}")
        failed = {"status": FAILED, "error": f"{type(error).__name__}: {error}"}
        return {**row, **failed, "run_id": tracking.find_child_run(parent_id, trial.index)}


def main(config: SweepConfig) -> dict:
    """The command line's run: what fails in seconds is checked first, then the flow runs and its
    outcome is printed in one line; a user error exits with `error: MESSAGE`."""
    with user_errors_exit():
        if config.task_runner in ("threads", "processes"):  # trials on this machine: its hardware fits?
            resolve_precision(config.base.precision, resolve_device(config.base.device))
        check_machine_fits(config)
        prepare_servers()
        result = sweep_flow(config)
    print(
        f"best of {len(result['trials'])} trials: {result['best_trial']} {result['best_settings']}, "
        f"test accuracy {result['test_accuracy']:.4f}; versions {result['versions']} -> {result['alias']} "
        f"({result['reason']}); outputs in {result['run_dir']}"
    )
    return result


if __name__ == "__main__":
    main(parse_sweep_config())
