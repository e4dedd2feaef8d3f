"""Train, evaluate, export, validate and register an image classifier, as one Prefect flow.

`python flows/train_flow.py FLAGS` (from the checkout, where `pip install -e .` makes flows, tasks,
models and common importable) runs it once, on PREFECT_API_URL's server or Prefect's own temporary one.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.states import Cancelled

from common.path_settings import resolve_path
from flows.cli import parse_config, prepare_servers, user_errors_exit
from flows.config import TrainConfig
from flows.confinement import check_confined
from flows.recipe import (
    data_shape,
    flow_device,
    follow_rank_0,
    model_spec,
    parallel_plan,
    train_settings,
    world_size,
)
from models import pretrained_file
from tasks.data.augment import resolve_augment
from tasks.data.steps import build_loaders, fetch_dataset, fetch_weights
from tasks.publish.gate_lock import require_shared_prefect
from tasks.publish.stage import publish_model
from tasks.track.cancellation import FlowRunCancelled
from tasks.track.reports import artifact_key
from tasks.track.steps import log_dataset, make_run_dir, mlflow_run
from tasks.train import torchrun
from tasks.train.speed import resolve_precision, set_threads
from tasks.train.steps import Watch, train_model


@flow(name="train-image-classifier", log_prints=True)
def train_flow(config: TrainConfig = TrainConfig()) -> dict:
    """Fetch data, train, evaluate, save, export ONNX, validate it and register the model."""
    check_confined(config)
    require_shared_prefect()  # a tracking server's gate needs the team's Prefect server: refuse now
    device = str(flow_device(config))
    set_threads(config.threads)
    run_dir = make_run_dir(resolve_path(config.output_dir))
    try:
        with mlflow_run(config.experiment, config.model_dump(), device, run_dir) as run_id:
            if config.weights == "imagenet":  # before any data work: offline, it fails in seconds
                fetch_weights(config.model)
            data_dir, workers = resolve_path(config.data_dir), config.prepare_workers
            dataset = fetch_dataset(config.dataset, data_dir, data_shape(config), workers)
            log_dataset(run_id, dataset, config.seed, config.val_fraction)
            spec, settings = model_spec(config, dataset), train_settings(config)
            augment = resolve_augment(config.augment, config.dataset, dataset.channels)
            loaders = build_loaders(
                dataset, config.batch_size, config.val_fraction, config.seed, device, augment
            )
            timeout = config.train_timeout_minutes and config.train_timeout_minutes * 60
            train = train_model.with_options(retries=config.train_retries, timeout_seconds=timeout)
            progress_key = artifact_key(config.model_name, "training")
            patience = config.tracking_patience_minutes * 60
            watch = Watch(
                config.system_metrics, progress_key, sys.stdout.isatty(), patience, stop_when_cancelled=True
            )
            parallel = parallel_plan(config, dataset, loaders.train.labels.device)
            trained = train(spec, loaders, settings, run_dir, run_id, watch, parallel)
            params = config.model_dump()
            published = publish_model(
                trained, loaders.test, dataset, config.model_name, params, run_dir, run_id
            )
    except FlowRunCancelled as cancelled:
        return Cancelled(message=str(cancelled))  # what Prefect asked for: the run ends Cancelled
    return {"mlflow_run_id": run_id, "run_dir": str(run_dir), **published}


def main(config: TrainConfig) -> dict:
    """The command line's run: what fails in seconds is checked first, then the flow runs and its
    outcome is printed in one line; a user error exits with `error: MESSAGE`."""
    with user_errors_exit():
        if config.weights == "imagenet":
            pretrained_file(config.model)  # offline without them: named before any server or data work
        device = flow_device(config)  # `--device cuda` here? fp16? more devices than present?
        resolve_precision(config.precision, device)
        world_size(config, device)
        if torchrun.is_follower():  # torchrun started this process as a rank other than 0
            return follow_rank_0(config, device)
        prepare_servers()
        result = train_flow(config)
    print(
        f"test accuracy {result['test_accuracy']:.4f}; versions {result['versions']} -> {result['alias']} "
        f"({result['reason']}); outputs in {result['run_dir']}"
    )
    return result


if __name__ == "__main__":
    main(parse_config())
