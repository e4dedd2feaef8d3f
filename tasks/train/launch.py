"""Starting the ranks of one training from the flow's process: how many, and torch's elastic
launcher on this machine. The flow's process stays the one that records: it relays rank 0's events
to the training callbacks while the ranks train (tasks.train.ray_training does the same on Ray)."""

from __future__ import annotations

import dataclasses
import functools
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from common import compat
from common.errors import UserError
from tasks.train.ranks import FileChannel, RankJob
from tasks.train.speed import usable_cpus

Handler = Callable[[dict[str, Any]], None]  # one event of rank 0's


class DevicesError(UserError, ValueError):
    """--devices asks for more than the machine has."""


class RanksFailedError(RuntimeError):
    """A rank of the training died, hung past the collective timeout or raised."""


def capacity(device: torch.device) -> tuple[int, str]:
    """How many processes this machine takes for `device`, and of what: GPUs on CUDA, else CPUs."""
    return (torch.cuda.device_count(), "GPUs") if device.type == "cuda" else (usable_cpus(), "CPUs")


def resolve_devices(requested: str, device: torch.device) -> int:
    """`auto` is every GPU on CUDA and one process elsewhere; a number is checked against what this
    machine has (GPUs on CUDA, CPUs on CPU)."""
    if requested == "auto":
        return torch.cuda.device_count() if device.type == "cuda" else 1
    count = int(requested)
    have, what = capacity(device)
    if device.type not in ("cuda", "cpu") and count > 1:
        raise DevicesError(f"--devices {count} trains on cuda or cpu; {device.type} takes --devices 1")
    if count > have:
        raise DevicesError(f"--devices {count} asks for more processes than this machine's {have} {what}")
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relay(
    launch: Callable[[], None], receive: Callable[[], list], handle: Handler, stop: Callable[[], None]
) -> None:
    """Runs `launch` (which blocks until every rank has ended) in a thread while this thread hands
    each event `receive` returns to `handle`. An error from `handle` (the run was cancelled) asks
    the ranks to `stop`, and is raised once they have; a failed launch raises RanksFailedError."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            launch()
        except BaseException as error:  # noqa: BLE001 - re-raised in the flow's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="training-ranks", daemon=True)
    thread.start()
    stopping: list[BaseException] = []
    try:
        while True:
            ended = not thread.is_alive()  # read before the last events, so none is missed
            for event in receive():
                if stopping:
                    continue
                try:
                    handle(event)
                except Exception as error:  # noqa: BLE001 - raised once the ranks have stopped
                    stopping.append(error)
                    stop()
            if ended:
                break
            thread.join(0.2)
    except BaseException:  # interrupted here (a timeout, Ctrl-C): the ranks must not run on
        stop()
        thread.join()
        raise
    if stopping:
        raise stopping[0]
    if failure:
        raise RanksFailedError(describe_failure(failure[0])) from failure[0]


def describe_failure(error: BaseException) -> str:
    """One line on which ranks failed and how: first those that failed of themselves, then those the
    launcher then stopped (SIGTERM)."""
    if not isinstance(error, ChildFailedError):
        return f"the training's ranks failed: {error}"

    def stopped_by_launcher(item: tuple[int, Any]) -> tuple[bool, float]:
        return item[1].exitcode == -signal.SIGTERM, item[1].timestamp

    parts = []
    for rank, failure in sorted(error.failures.items(), key=stopped_by_launcher):
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        detail = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        parts.append(f"rank {rank} ({how})" + (f": {detail.splitlines()[0]}" if detail else ""))
    return "the training's ranks failed: " + "; ".join(parts)


def train_local(job: RankJob, devices: int, folder: Path, handle: Handler) -> None:
    """Trains `job` in `devices` processes on this machine, started by torch's elastic launcher (no
    restarts: a failed rank fails the group, and the train step's retry resumes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    channel = FileChannel(folder)
    job_file = folder / "job.json"
    job_file.write_text(dataclasses.replace(job, events=str(folder)).to_json())
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=devices,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # The launcher warns, run from a thread, that it cannot catch signals to stop its ranks: each
    # rank ends itself once its parent is gone (tasks.train.ranks.exit_when_orphaned).
    compat.quiet_elastic_launcher()
    command = elastic_launch(config, sys.executable)
    ranks = functools.partial(command, "-m", "tasks.train.ranks", str(job_file))
    relay(ranks, channel.receive, handle, channel.request_stop)
