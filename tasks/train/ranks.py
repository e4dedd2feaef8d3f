"""One rank of a data-parallel training: what every process of the group runs, however it was
started (torch's elastic launcher, torchrun or Ray Train). No Prefect and no MLflow here: rank 0
sends its progress to the flow's process through a channel, and the flow's process records it.

`python -m tasks.train.ranks JOB_FILE` is the command the elastic launcher starts once per rank."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from models import ModelSpec
from tasks.data.datasets import DatasetRef
from tasks.data.loaders import make_loaders
from tasks.train import collectives
from tasks.train.checkpoints import CheckpointFile
from tasks.train.collectives import Checkpoints, SharedCheckpoints
from tasks.train.speed import Levers
from tasks.train.training import TrainSettings, train

_REPORT_INTERVAL = 0.5  # seconds between rank 0's progress reports (and its looks for a stop)


class StopRequested(RuntimeError):
    """The flow's process asked the ranks to stop (its run was cancelled)."""


@dataclasses.dataclass(frozen=True)
class RankJob:
    """Everything a rank needs to train its share: small, and the same on every rank."""

    spec: ModelSpec
    settings: TrainSettings
    dataset: DatasetRef  # prepared_path: where this rank's machine holds the prepared file
    batch_size: int  # the global batch
    val_fraction: float
    augment: str
    device: str  # cpu or cuda: each rank takes its local rank's GPU
    threads: int  # torch threads per rank on CPU
    timeout_seconds: float  # a collective waiting longer than this fails the group
    checkpoint: Optional[str] = None  # rank 0's checkpoint file, when it shares the flow's machine
    events: Optional[str] = None  # the folder of rank 0's file channel to the flow's process

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RankJob":
        fields = json.loads(text)
        parts = {"spec": ModelSpec, "settings": TrainSettings, "dataset": DatasetRef}
        for name, kind in parts.items():  # tuples came back as lists
            values = fields[name].items()
            fields[name] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values})
        return cls(**fields)


class Channel(Protocol):
    """Rank 0's line to the flow's process."""

    def send(self, event: dict[str, Any]) -> None: ...

    def stop_requested(self) -> bool: ...


class FileChannel:
    """Events as JSON lines in `folder/events.jsonl`, a stop as the file `folder/stop`: for ranks on
    the flow's own machine."""

    def __init__(self, folder: Path) -> None:
        self.events, self.stop = folder / "events.jsonl", folder / "stop"
        self.offset = 0

    def send(self, event: dict[str, Any]) -> None:
        with open(self.events, "a") as out:
            out.write(json.dumps(event) + "\n")

    def stop_requested(self) -> bool:
        return self.stop.exists()

    def request_stop(self) -> None:
        self.stop.touch()

    def receive(self) -> list[dict[str, Any]]:
        """The events sent since the last call (whole lines only)."""
        if not self.events.exists():
            return []
        with open(self.events) as handle:
            handle.seek(self.offset)
            text = handle.read()
        whole = text[: text.rfind("\n") + 1]
        self.offset += len(whole.encode())
        return [json.loads(line) for line in whole.splitlines()]


class Reporter:
    """Rank 0's training callbacks, sent through `channel`; progress at most every half second, when
    it also looks for a stop."""

    def __init__(self, channel: Channel) -> None:
        self.channel, self.reported = channel, 0.0

    def on_start(self, levers: Levers) -> None:
        threads, backend = str(torch.get_num_threads()), collectives.backend_name()
        tags = {**levers.tags(), "threads": threads, "backend": backend}
        self.channel.send({"kind": "start", "tags": tags})

    def on_batch(self, epoch: int, batch: int) -> None:
        if time.monotonic() - self.reported < _REPORT_INTERVAL:
            return
        self.reported = time.monotonic()
        if self.channel.stop_requested():
            raise StopRequested("the flow's process asked the ranks to stop")
        self.channel.send({"kind": "batch", "epoch": epoch, "batch": batch})

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.channel.send({"kind": "epoch", "epoch": epoch, "metrics": metrics})


def rank_device(kind: str, local_rank: int) -> torch.device:
    """Rank `local_rank`'s GPU on CUDA (one per process), else the CPU."""
    if kind != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def train_rank(
    job: RankJob, device: torch.device, checkpoints: Optional[Checkpoints], channel: Optional[Channel]
) -> list[dict[str, float]]:
    """Trains this rank's share on `device` in the process group already set up; rank 0 passes its
    `checkpoints` and `channel` (None on the others). Returns the per-epoch metrics."""
    if device.type == "cpu":
        torch.set_num_threads(job.threads)
    rank, world = collectives.rank(), collectives.world_size()
    loaders = make_loaders(
        job.dataset, job.batch_size, job.val_fraction, job.settings.seed, device, job.augment, rank, world
    )
    reporter = Reporter(channel) if channel is not None else None
    _, history = train(
        job.spec,
        loaders,
        job.settings,
        SharedCheckpoints(checkpoints),
        reporter and reporter.on_epoch,
        reporter and reporter.on_batch,
        reporter and reporter.on_start,
    )
    return history


def backend(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def exit_when_orphaned(interval: float = 1.0) -> None:
    """Ends this process when its parent (the launcher) is gone, so a killed flow leaves no rank."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


@record  # a failing rank's traceback reaches the launcher's error
def main(argv: list[str]) -> None:
    """One rank under torch's elastic launcher, which sets RANK, LOCAL_RANK, WORLD_SIZE and the
    rendezvous in the environment."""
    exit_when_orphaned()
    job = RankJob.from_json(Path(argv[0]).read_text())
    dist.init_process_group(backend(job.device), timeout=timedelta(seconds=job.timeout_seconds))
    try:
        first = dist.get_rank() == 0
        checkpoints = CheckpointFile(Path(job.checkpoint)) if first and job.checkpoint else None
        channel = FileChannel(Path(job.events)) if first and job.events else None
        train_rank(job, rank_device(job.device, int(os.environ["LOCAL_RANK"])), checkpoints, channel)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
