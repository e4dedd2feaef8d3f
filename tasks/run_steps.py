"""Prefect tasks that open, annotate and close the flow run's one MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from mlflow.entities import RunStatus
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import tracking
from tasks.datasets import DatasetRef


@task(name="open-mlflow-run", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def open_mlflow_run(
    experiment: str,
    params: Mapping[str, object],
    flow_run_id: str,
    flow_run_name: str,
    device: str,
    run_dir: Path,
    extra_tags: Optional[Mapping[str, str]] = None,
) -> str:
    """Starts the run (or reopens the one a retried flow run already started) and logs the config."""
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
def log_dataset(run_id: str, dataset: DatasetRef) -> None:
    """Tags the run with the data it trained on."""
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
def close_mlflow_run(run_id: str, succeeded: bool) -> None:
    """Marks the run FINISHED or FAILED."""
    tracking.finish_run(run_id, succeeded)
