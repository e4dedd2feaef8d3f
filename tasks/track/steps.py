"""Prefect tasks that open, annotate and close the flow run's one MLflow run, and report on it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from mlflow.entities import RunStatus
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from tasks.data.datasets import DatasetRef
from tasks.publish.evaluation import Evaluation
from tasks.retrying import retry_except
from tasks.track import delivery, lineage, reports, tracking
from tasks.track.cancellation import ended_status


@task(
    name="open-mlflow-run",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_except(delivery.TrackingUnavailableError),  # it waited already
    **tracking.MLFLOW_RETRIES,
)
def open_mlflow_run(
    experiment: str,
    params: Mapping[str, object],
    flow_run_id: str,
    flow_run_name: str,
    device: str,
    run_dir: Path,
    extra_tags: Optional[Mapping[str, str]] = None,
) -> str:
    """Starts the run (or reopens the one a retried flow run already started) and logs the config;
    fails at once, naming it, when the tracking server does not answer."""
    delivery.check_reachable()
    run_id = tracking.find_run(experiment, flow_run_id)
    if run_id is None:
        tags = {
            "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_name": flow_run_name,
            "device": device,
            "torch_version": torch.__version__,
            **tracking.git_tags(),
            **(extra_tags or {}),
        }
        run_id = tracking.start_run(experiment, flow_run_name, tags)
        tracking.log_params(run_id, params)
    else:
        tracking.get_client().update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    config_path = run_dir / "config.json"
    config_path.write_text(
        json.dumps({**params, "resolved_device": device, "run_dir": str(run_dir)}, indent=2)
    )
    tracking.log_artifacts(run_id, [config_path])
    return run_id


@task(name="log-dataset", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def log_dataset(
    run_id: str, dataset: DatasetRef, seed: Optional[int] = None, val_fraction: Optional[float] = None
) -> None:
    """Tags the run with the data it trained on and, given the split, logs the training, validation
    and test splits as its dataset inputs."""
    if val_fraction is not None:
        lineage.log_splits(run_id, dataset, seed, val_fraction)
    tracking.log_tags(
        run_id,
        {
            "dataset": dataset.name,
            "dataset_sha256": dataset.sha256,
            "dataset_classes": len(dataset.class_names),
            "dataset_train_size": dataset.train_size,
            "dataset_test_size": dataset.test_size,
        },
    )


@task(name="close-mlflow-run", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def close_mlflow_run(run_id: str, status: str) -> None:
    """Marks the run FINISHED, FAILED or KILLED."""
    tracking.finish_run(run_id, status)


def make_run_dir(output_dir: Path) -> Path:
    """A folder of this flow run's own, the same for every retry of it."""
    run_dir = output_dir / f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{flow_run.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextmanager
def mlflow_run(
    experiment: str,
    params: Mapping[str, object],
    device: str,
    run_dir: Path,
    extra_tags: Optional[Mapping[str, str]] = None,
) -> Iterator[str]:
    """The flow run's MLflow run: opened (or reopened) on entry; on exit FINISHED, FAILED, or KILLED
    when the run was told to stop (cancelled in Prefect, SIGTERM as a worker cancels, Ctrl-C)."""
    run_id = open_mlflow_run(experiment, params, flow_run.id, flow_run.name, device, run_dir, extra_tags)
    try:
        yield run_id
    except delivery.TrackingUnavailableError:
        raise  # nothing to tell a server that is not there; a retry reopens the run
    except (TerminationSignal, KeyboardInterrupt):
        tracking.finish_run(run_id, "KILLED")  # no task: the engine is stopping
        raise
    except BaseException as error:
        close_mlflow_run(run_id, ended_status(error))
        raise
    close_mlflow_run(run_id, "FINISHED")


@task(name="report-run", cache_policy=NO_CACHE)
def report_run(
    name: str, evaluation: Evaluation, parity: dict, registration: dict, outputs: dict[str, str]
) -> None:
    """The run's summary and per-class table as Prefect artifacts, keyed by the registered name."""
    reports.publish_run_summary(name, evaluation, parity, registration, outputs)
