"""Prefect tasks of the data stage: fetch the pretrained weights and the dataset, build the loaders."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from common.retrying import retry_on
from models import pretrained_file
from tasks.data.datasets import DatasetRef, prepare_dataset
from tasks.data.loaders import Loaders, make_loaders
from tasks.data.mnist_files import DownloadError
from tasks.data.sources import DataSource, Shape


@task(name="fetch-weights", retries=2, retry_delay_seconds=[1, 3], cache_policy=NO_CACHE)
def fetch_weights(model: str) -> str:
    """Finds torchvision's ImageNet weights for `model` in the TORCH_HOME cache, or downloads them."""
    return str(pretrained_file(model))


@task(
    name="fetch-dataset",
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on(DownloadError),  # a bad checksum or CSV will not fix itself
    cache_policy=NO_CACHE,
)
def fetch_dataset(
    source: DataSource, data_dir: Path, shape: Shape = Shape(), workers: Optional[int] = None
) -> DatasetRef:
    """Fetches the source's data and prepares it, in `shape`, as one memory-mapped uint8 file in
    `data_dir`; photos are decoded by `workers` processes (default: one per core), with a progress
    bar on a terminal."""
    workers = workers or usable_cores()
    logger = get_run_logger()  # warnings reach the UI
    with progress_bar(sys.stdout.isatty()) as progress:
        return prepare_dataset(source, data_dir, logger, shape, workers, progress)


def usable_cores() -> int:
    """The cores this process may run on (its affinity on Linux), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def progress_bar(shown: bool) -> Iterator[Optional[Callable[[int, int], None]]]:
    """progress(images, total) advancing a bar of images prepared, or None when not `shown`."""
    if not shown:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task_id = bar.add_task("preparing images", total=None)
        yield lambda images, total: bar.update(task_id, advance=images, total=total)


@task(name="build-loaders", cache_policy=NO_CACHE)
def build_loaders(
    dataset: DatasetRef, batch_size: int, val_fraction: float, seed: int, device: str, augment: str = "none"
) -> Loaders:
    """Builds the run's train/validation/test loaders; they stay in this process."""
    return make_loaders(dataset, batch_size, val_fraction, seed, device, augment)
