"""Prefect tasks of the training stage: train with checkpoints, log and show every epoch."""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from rich.console import Console

from common.retrying import retry_except
from models import ModelSpec
from tasks.data.loaders import Loaders
from tasks.track import tracking
from tasks.track.cancellation import CancelWatch, FlowRunCancelled
from tasks.track.delivery import MetricsOutbox, TrackingUnavailableError
from tasks.train import checkpoints
from tasks.train.parallel import Parallel, RankCallbacks, rank_job, train_ranks
from tasks.train.progress import TrainingProgress
from tasks.train.speed import Levers
from tasks.train.training import TrainSettings, train


@dataclass(frozen=True)
class TrainedModel:
    spec: ModelSpec
    checkpoint_path: str
    history: list[dict[str, float]]

    def weights(self) -> dict:
        """The trained state_dict, read from the last checkpoint."""
        return checkpoints.load_weights(Path(self.checkpoint_path))["model"]


@dataclass(frozen=True)
class Watch:
    """How a training run is watched besides its per-epoch metrics."""

    system_metrics: bool = False  # MLflow system/* metrics while training
    progress_key: Optional[str] = None  # Prefect progress artifact key
    console: bool = False  # a progress bar within each epoch (for a terminal)
    tracking_patience: float = 600.0  # seconds training goes on while the tracking server is away
    stop_when_cancelled: bool = False  # check the flow run's state in Prefect while training


@task(
    name="train-model",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    # A tracking server away past patience would still be away: the flow fails, its retry resumes.
    retry_condition_fn=retry_except(TrackingUnavailableError, FlowRunCancelled),
)
def train_model(
    spec: ModelSpec,
    loaders: Loaders,
    settings: TrainSettings,
    run_dir: Path,
    run_id: str,
    watch: Watch,
    parallel: Optional[Parallel] = None,
) -> TrainedModel:
    """Trains with per-epoch checkpoints (a retry resumes every rank) and logs every epoch to MLflow."""
    return train_logged(spec, loaders, settings, run_dir, run_id, watch, parallel)


def train_logged(
    spec: ModelSpec,
    loaders: Loaders,
    settings: TrainSettings,
    run_dir: Path,
    run_id: str,
    watch: Watch = Watch(),
    parallel: Optional[Parallel] = None,
) -> TrainedModel:
    """train() with checkpoints in run_dir, each epoch printed and logged to the MLflow run (through
    an outbox: training goes on while the tracking server is away, up to `watch.tracking_patience`);
    with `watch.stop_when_cancelled`, stopped mid-epoch (FlowRunCancelled) once Prefect marks the
    flow run cancelled, the last whole epoch's checkpoint kept.

    With `parallel` over several processes, the ranks train and this process records rank 0's
    epochs and progress: it alone talks to MLflow and Prefect."""
    checkpoint = run_dir / "checkpoints" / "last.pt"
    console = Console() if watch.console else None
    progress = TrainingProgress(settings.epochs, len(loaders.train), watch.progress_key, console)
    outbox = MetricsOutbox(run_id, watch.tracking_patience)

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        progress.epoch_done(epoch)
        print(f"epoch {epoch}/{settings.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        outbox.put(metrics, step=epoch)

    cancelled = CancelWatch() if watch.stop_when_cancelled else None

    def on_batch(epoch: int, batch: int) -> None:
        progress.batch_done(epoch, batch)
        if cancelled:
            cancelled()

    def log_levers(levers: Levers) -> None:
        tracking.log_tags(run_id, {**levers.tags(), "threads": str(torch.get_num_threads())})

    world = parallel.devices if parallel is not None else 1
    tracking.log_params(run_id, {"world_size": world, "batch_per_process": loaders.train.batch_size // world})
    with tracking.system_metrics(run_id, watch.system_metrics), progress:
        try:
            if parallel is None or not parallel.spans_processes:
                _, history = train(spec, loaders, settings, checkpoint, log_epoch, on_batch, log_levers)
            else:
                job = rank_job(spec, settings, loaders, parallel, checkpoint)
                tracking.log_tags(run_id, {"train_on": parallel.train_on})
                log_tags = functools.partial(tracking.log_tags, run_id)
                callbacks = RankCallbacks(log_epoch, on_batch, log_tags, checkpoint)
                history = train_ranks(job, parallel, run_dir / "ranks" / uuid.uuid4().hex, callbacks)
        except FlowRunCancelled:
            outbox.close()  # the epochs before it are in MLflow too
            raise
    outbox.close()
    # An attempt that died between checkpointing an epoch and logging it left a gap.
    tracking.log_missing_steps(run_id, history)
    return TrainedModel(spec, str(checkpoint), history)
