"""Dataset lineage: a run's training, validation and test splits as MLflow dataset inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from common import compat
from tasks.data.datasets import DatasetRef
from tasks.data.loaders import validation_size
from tasks.track.tracking import get_client

TRAINING, VALIDATION, TEST = "training", "validation", "test"


@dataclass(frozen=True)
class ImageSplit:
    """One split of a prepared image dataset, described by its origin, fingerprint and sizes: the
    metadata-only dataset MLflow stores for it (the digest is given: derived from the data's sha256)."""

    source: DatasetSource
    name: str
    digest: str
    profile: dict

    def to_dict(self) -> dict[str, str]:
        """The fields of MLflow's dataset entity, as mlflow.data's Dataset.to_dict() gives them."""
        return {
            "name": self.name,
            "digest": self.digest,
            "source": self.source.to_json(),
            "source_type": compat.dataset_source_type(self.source),
            "profile": json.dumps(self.profile),
        }

    def to_entity(self) -> DatasetEntity:
        """The split as MLflow stores it."""
        return DatasetEntity(**self.to_dict())


def origin_source(origin: str) -> DatasetSource:
    """A download URL, a local file, or the dotted name of the function that generates the data."""
    if origin.startswith(("http://", "https://")):
        return HTTPDatasetSource(origin)
    if origin.startswith(("/", "file://")):
        return compat.local_dataset_source(origin)
    return compat.code_dataset_source({"generator": origin})


def image_splits(dataset: DatasetRef, seed: int, val_fraction: float) -> dict[str, ImageSplit]:
    """The three splits of a run. The test split's digest is the data's sha256 (first 16 hex digits);
    training and validation, drawn from the training images by seed and fraction, append a hash of
    that recipe, so a run with another split never shares their digest (and MLflow's stored profile)."""
    shape = [dataset.channels, *dataset.image_size]
    sizes = split_sizes(dataset, val_fraction)
    splits = {}
    for context, rows in sizes.items():
        digest = dataset.sha256[:16]
        if context != TEST:
            recipe = f"{context}:{seed}:{val_fraction}".encode()
            digest += "-" + hashlib.sha256(recipe).hexdigest()[:8]
        origin = dataset.test_origin if context == TEST else dataset.train_origin
        profile = {"num_rows": rows, "num_classes": dataset.num_classes, "image_shape": shape}
        if context != TEST:
            profile.update(seed=seed, val_fraction=val_fraction)
        splits[context] = ImageSplit(origin_source(origin), dataset.name, digest, profile)
    return splits


def split_sizes(dataset: DatasetRef, val_fraction: float) -> dict[str, int]:
    """Images per split, by context."""
    val_size = validation_size(dataset.train_size, val_fraction)
    return {TRAINING: dataset.train_size - val_size, VALIDATION: val_size, TEST: dataset.test_size}


def log_splits(run_id: str, dataset: DatasetRef, seed: int, val_fraction: float) -> None:
    """Logs the splits as the run's dataset inputs, each tagged with its context."""
    inputs = [
        DatasetInput(split.to_entity(), [InputTag(compat.reserved_tag(compat.DATASET_CONTEXT_TAG), context)])
        for context, split in image_splits(dataset, seed, val_fraction).items()
    ]
    try:
        get_client().log_inputs(run_id, datasets=inputs)
    except MlflowException:
        # Runs that log the same new dataset at once (a sweep's trials) race in MLflow's insert,
        # and the later one fails on a unique constraint; the dataset exists now, so once more
        # links it (any other error comes back again).
        get_client().log_inputs(run_id, datasets=inputs)
