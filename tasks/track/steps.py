"""Prefect tasks that open, annotate and close the flow run's one MLflow run."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from mlflow.entities import RunStatus
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from common.files import OutputWriteError, atomic_output
from common.redaction import redact_params
from tasks.data.datasets import DatasetRef
from tasks.track import delivery, lineage, tracking
from tasks.track.cancellation import ended_status
from tasks.track.retries import mlflow_retries

_FOLDER_NAME_LIMIT = 80  # characters of a run folder's name taken from the flow run's name


@task(
    name="open-mlflow-run",
    cache_policy=NO_CACHE,
    **mlflow_retries(),  # not after a TrackingUnavailableError: check_reachable waited already
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
    tracking.log_artifacts(run_id, [write_config(run_dir, params, device)])
    return run_id


def write_config(run_dir: Path, params: Mapping[str, object], device: str) -> Path:
    """The run's settings as run_dir/config.json (atomically, URLs without their credentials)."""
    path = run_dir / "config.json"
    settings = {**redact_params(params), "resolved_device": device, "run_dir": str(run_dir)}
    with atomic_output(path) as handle:
        json.dump(settings, handle, indent=2)
    return path


@task(name="log-dataset", cache_policy=NO_CACHE, **mlflow_retries())
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


@task(name="close-mlflow-run", cache_policy=NO_CACHE, **mlflow_retries())
def close_mlflow_run(run_id: str, status: str) -> None:
    """Marks the run FINISHED, FAILED or KILLED."""
    tracking.finish_run(run_id, status)


def make_run_dir(output_dir: Path) -> Path:
    """A folder of this flow run's own, the same for every retry of it, inside `output_dir` whatever
    the flow run's name (whoever starts a run names it)."""
    name = f"{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}-{folder_name(flow_run.name)}"
    run_dir = output_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.resolve().parent != output_dir.resolve():  # a link planted under that name
        raise OutputWriteError(errno.EEXIST, "exists and leads out of --output-dir", str(run_dir))
    return run_dir


def folder_name(name: str) -> str:
    """`name` as one safe path component: only [A-Za-z0-9._-], no leading dot, at most 80
    characters; a name that had to change gets a hash of the original, so two stay apart."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip(".-")
    if slug == name and len(name) <= _FOLDER_NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{slug[: _FOLDER_NAME_LIMIT - 9]}-{digest}".lstrip("-")


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
