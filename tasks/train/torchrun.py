"""One training across machines under `torchrun`, which starts `flows/train_flow.py` once per rank:
rank 0 runs the flow (it alone talks to MLflow and Prefect) and trains in the group as its train
step; every other rank prepares the data on its own machine, takes the job from rank 0 and trains
its share."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from common.errors import UserError
from tasks.data.datasets import DatasetRef
from tasks.train.checkpoints import CheckpointFile
from tasks.train.ranks import RankJob, backend, rank_device, train_rank
from tasks.train.speed import physical_cores

Handler = Callable[[dict[str, Any]], None]


class DatasetMismatchError(UserError, RuntimeError):
    """A rank prepared other data than rank 0 (other files or flags on its machine)."""


class DirectChannel:
    """Rank 0's events handed straight to the train step's callbacks (same process)."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle

    def send(self, event: dict[str, Any]) -> None:
        self.handle(event)

    def stop_requested(self) -> bool:
        return False  # a cancel raises from the callbacks themselves


def active() -> bool:
    """Whether torchrun (or another launcher that sets RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def is_follower() -> bool:
    """A rank other than 0: it trains, and records nothing."""
    return active() and int(os.environ["RANK"]) != 0


def local_threads() -> int:
    """This machine's cores split between the ranks torchrun started on it."""
    return max(1, physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def join(device: str, timeout_seconds: float) -> None:
    """Joins torchrun's group (its rendezvous is in the environment)."""
    dist.init_process_group(backend(device), timeout=timedelta(seconds=timeout_seconds))


def lead(job: RankJob, handle: Handler) -> list[dict[str, float]]:
    """Rank 0's train step: joins the group, hands every rank the job and trains its own share,
    writing the checkpoints."""
    join(job.device, job.timeout_seconds)
    flow_threads = torch.get_num_threads()  # the flow's own steps go on after training
    try:
        dist.broadcast_object_list([job], src=0)
        checkpoints = CheckpointFile(Path(job.checkpoint))
        device = rank_device(job.device, int(os.environ.get("LOCAL_RANK", 0)))
        job = dataclasses.replace(job, threads=local_threads())
        return train_rank(job, device, checkpoints, DirectChannel(handle))
    finally:
        dist.destroy_process_group()  # on failure too: the other ranks fail at once, not at the timeout
        torch.set_num_threads(flow_threads)


def follow(device: str, timeout_seconds: float, prepare: Callable[[], DatasetRef]) -> list[dict[str, float]]:
    """A rank other than 0: prepares the data here with `prepare`, joins the group, takes the job
    from rank 0 and trains its share."""
    dataset = prepare()
    join(device, timeout_seconds)
    try:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0)
        job: RankJob = received[0]
        if dataset.sha256 != job.dataset.sha256:
            raise DatasetMismatchError(
                f"rank {dist.get_rank()} prepared {dataset.name} with sha256 {dataset.sha256[:12]}, rank 0 "
                f"{job.dataset.sha256[:12]}: give every node the same data and flags"
            )
        job = dataclasses.replace(job, dataset=dataset, checkpoint=None, threads=local_threads())
        return train_rank(job, rank_device(device, int(os.environ.get("LOCAL_RANK", 0))), None, None)
    finally:
        dist.destroy_process_group()
