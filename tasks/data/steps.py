"""Prefect tasks of the data stage: fetch the dataset, build the loaders."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.data.datasets import DatasetRef, prepare_dataset
from tasks.data.loaders import Loaders, make_loaders
from tasks.data.mnist_files import DownloadError
from tasks.retrying import retry_on


@task(
    name="fetch-dataset",
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on(DownloadError),  # a bad checksum or CSV will not fix itself
    cache_policy=NO_CACHE,
)
def fetch_dataset(name: str, data_dir: Path, **options) -> DatasetRef:
    """Fetches the dataset and stores it as uint8 tensors for the loaders."""
    return prepare_dataset(name, data_dir, logger=get_run_logger(), **options)  # warnings reach the UI


@task(name="build-loaders", cache_policy=NO_CACHE)
def build_loaders(
    dataset: DatasetRef, batch_size: int, val_fraction: float, seed: int, device: str
) -> Loaders:
    """Builds the run's train/validation/test loaders; they stay in this process."""
    return make_loaders(dataset, batch_size, val_fraction, seed, device)
