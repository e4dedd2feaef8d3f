"""One training as a Ray Train job (TorchTrainer) on a Ray cluster the user runs, or on a local
Ray started for it. The flow's process stays the recorder: data preparation, evaluation, export and
the registry stay in the flow run.

No folder is assumed in common between the flow's machine and the Ray workers: the prepared file
travels through Ray's object store (each worker's machine writes it once into its temp folder,
named by its sha256); rank 0 sends each epoch's checkpoint back as bytes through a Ray queue, and
the flow's process writes it; a retry hands the last one to the new rank 0 the same way."""

from __future__ import annotations

import dataclasses
import io
import logging
import tempfile
import uuid
from pathlib import Path
from queue import Empty
from typing import Any, Optional

import ray
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device
from ray.util.queue import Queue

from common.files import atomic_path
from tasks.train.launch import DevicesError, Handler, relay
from tasks.train.ranks import RankJob, backend, train_rank


class QueueChannel:
    """Rank 0's events on one Ray queue, the flow's stop on another."""

    def __init__(self, events: Queue, stops: Queue) -> None:
        self.events, self.stops = events, stops

    def send(self, event: dict[str, Any]) -> None:
        self.events.put(event)

    def stop_requested(self) -> bool:
        return not self.stops.empty()


class SentCheckpoints:
    """Rank 0's checkpoints as bytes: the one to resume from arrives with the job, each new one goes
    to the flow's process."""

    origin = "the flow's last checkpoint"

    def __init__(self, resume: Optional[bytes], channel: QueueChannel) -> None:
        self.resume, self.channel = resume, channel

    def load(self) -> Optional[dict]:
        return torch.load(io.BytesIO(self.resume), weights_only=True) if self.resume else None

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.channel.send({"kind": "checkpoint", "state": buffer.getvalue()})


def local_copy(data: ray.ObjectRef, name: str) -> Path:
    """The prepared file on this worker's machine, written from the object store once per machine."""
    path = Path(tempfile.gettempdir()) / "prefect-image-classifier" / "prepared" / name
    if not path.exists():
        with atomic_path(path) as tmp:  # ranks on one machine may write it at once: the last rename wins
            tmp.write_bytes(ray.get(data))
    return path


def rank_loop(config: dict[str, Any]) -> None:
    """Ray Train's loop on every worker, in the process group Ray Train set up."""
    job: RankJob = config["job"]
    name = f"{job.dataset.sha256}{Path(job.dataset.prepared_path).suffix}"
    dataset = dataclasses.replace(job.dataset, prepared_path=str(local_copy(config["data"], name)))
    job = dataclasses.replace(job, dataset=dataset)
    first = ray.train.get_context().get_world_rank() == 0
    channel = QueueChannel(config["events"], config["stops"]) if first else None
    resume = ray.get(config["resume"]) if first and config["resume"] is not None else None
    checkpoints = SentCheckpoints(resume, channel) if first else None
    train_rank(job, get_device(), checkpoints, channel)


def worker_device(requested: str, workers: int, cpus_each: int) -> str:
    """cuda or cpu for the workers: --device cuda, or auto where the cluster has a GPU per worker;
    a cluster too small for the workers is refused here (Ray Train would wait for it forever)."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if requested == "cuda" and gpus < workers:
        raise DevicesError(f"--device cuda --devices {workers}: the Ray cluster has {gpus:g} GPUs")
    if cpus < workers * cpus_each:
        raise DevicesError(
            f"--devices {workers}: {workers} Ray workers of {cpus_each} CPUs each need {workers * cpus_each} "
            f"CPUs; the cluster has {cpus:g} (--threads sets the CPUs of all the workers together)"
        )
    return "cuda" if requested == "cuda" or (requested == "auto" and gpus >= workers) else "cpu"


def train_on_ray(
    job: RankJob, devices: int, address: Optional[str], device: str, folder: Path, handle: Handler
) -> None:
    """Trains `job` as a TorchTrainer of `devices` workers on `device` (cuda, cpu, or auto: GPUs
    where the cluster has them) on the cluster at `address` (None: a local Ray for this training,
    stopped after it)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
    try:
        job = dataclasses.replace(job, device=worker_device(device, devices, job.threads))
        checkpoint = Path(job.checkpoint)
        events, stops = (Queue(actor_options={"num_cpus": 0}) for _ in range(2))
        config = {
            "job": dataclasses.replace(job, checkpoint=None),
            "data": ray.put(Path(job.dataset.prepared_path).read_bytes()),
            "resume": ray.put(checkpoint.read_bytes()) if checkpoint.exists() else None,
            "events": events,
            "stops": stops,
        }
        trainer = TorchTrainer(
            rank_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=devices, use_gpu=job.device == "cuda", resources_per_worker={"CPU": job.threads}
            ),
            torch_config=TorchConfig(backend=backend(job.device), timeout_s=int(job.timeout_seconds)),
            run_config=RunConfig(
                name=f"train-{uuid.uuid4().hex[:12]}",
                storage_path=str(folder),
                failure_config=FailureConfig(max_failures=0),  # the train step's retry resumes instead
            ),
        )

        def receive() -> list[dict[str, Any]]:
            received = []
            try:
                while True:
                    received.append(events.get_nowait())
            except Empty:
                return received

        relay(trainer.fit, receive, handle, lambda: stops.put("stop"))
    finally:
        if started:
            ray.shutdown()
