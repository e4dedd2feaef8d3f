"""One training over several processes, as the train step sees it: which ranks, started how, and
rank 0's events turned back into the step's callbacks (MLflow, Prefect, the console) in the flow's
own process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from common.files import atomic_path
from models import ModelSpec
from tasks.data.datasets import DatasetRef
from tasks.data.loaders import Loaders
from tasks.train import checkpoints, launch, torchrun
from tasks.train.ranks import RankJob
from tasks.train.training import BatchCallback, EpochCallback, TrainSettings


@dataclass(frozen=True)
class Parallel:
    """How one training spreads over processes, and what its ranks rebuild their loaders from."""

    devices: int  # processes in the group
    dataset: DatasetRef
    val_fraction: float
    train_on: str = "local"  # local (torch's elastic launcher), ray (Ray Train) or torchrun (its group)
    address: Optional[str] = None  # the Ray cluster; None starts a local one for the training
    timeout_seconds: float = 300.0  # the collective timeout: how long a rank waits on the others
    device: str = "auto"  # on Ray, the workers' device as asked for: auto takes the cluster's GPUs

    @property
    def spans_processes(self) -> bool:
        return self.devices > 1 or self.train_on == "ray"


@dataclass(frozen=True)
class RankCallbacks:
    """The train step's callbacks, fed from rank 0's events."""

    on_epoch: EpochCallback
    on_batch: BatchCallback
    on_start: Callable[[dict[str, str]], None]  # rank 0's tags: levers, threads, backend
    checkpoint: Path  # where the flow's process keeps the run's checkpoint

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            self.on_start(event["tags"])
        elif kind == "batch":
            self.on_batch(event["epoch"], event["batch"])
        elif kind == "epoch":
            self.on_epoch(event["epoch"], event["metrics"])
        elif kind == "checkpoint":  # from ranks with no folder in common with this process
            with atomic_path(self.checkpoint) as tmp:
                tmp.write_bytes(event["state"])


def rank_job(
    spec: ModelSpec, settings: TrainSettings, loaders: Loaders, parallel: Parallel, checkpoint: Path
) -> RankJob:
    """What every rank needs, from the loaders the flow built for one process."""
    device = loaders.train.labels.device.type
    return RankJob(
        spec,
        settings,
        parallel.dataset,
        loaders.train.batch_size,
        parallel.val_fraction,
        loaders.train.augment,
        device,
        threads=max(1, torch.get_num_threads() // parallel.devices),  # the machine's, split
        timeout_seconds=parallel.timeout_seconds,
        checkpoint=str(checkpoint),
    )


def train_ranks(job: RankJob, parallel: Parallel, folder: Path, callbacks: RankCallbacks) -> list[dict]:
    """Trains `job` on `parallel.devices` ranks, relaying rank 0's events to `callbacks`; returns the
    per-epoch metrics from the checkpoint rank 0 wrote last."""
    if parallel.train_on == "ray":
        from tasks.train.ray_training import train_on_ray  # Ray is an extra: imported when asked for

        train_on_ray(job, parallel.devices, parallel.address, parallel.device, folder, callbacks)
    elif parallel.train_on == "torchrun":
        torchrun.lead(job, callbacks)
    else:
        launch.train_local(job, parallel.devices, folder, callbacks)
    return checkpoints.load_weights(callbacks.checkpoint)["history"]
