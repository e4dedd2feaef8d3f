"""Loaders that cut batches by index out of memory-mapped uint8 images: no split is copied, each
batch is gathered, moved to the device and scaled (or augmented) there as a whole."""

from __future__ import annotations

import hashlib
from typing import Iterator, NamedTuple, Optional

import torch

from tasks.data.augment import augment_batch
from tasks.data.datasets import DatasetRef, load_tensors

_EVAL_BATCH = 256  # larger batches of small images spill the CPU's caches
_EVAL_BATCH_VALUES = 1 << 22  # and of large images hold large activations: 85 RGB images at 128 px


class TensorLoader:
    """Yields (float pixels in [0, 1], labels) batches of `images[indices]` (all images when
    `indices` is None), the labels on `device`.

    Much faster than a DataLoader over PIL images: no per-sample Python, one index per batch.
    `batch_size` is the global batch: with `world` processes, rank `rank` gets its share of each
    batch (the shares of one batch are disjoint and make it whole), so every rank takes the same
    number of steps. Each epoch's shuffle and augmentation are drawn from generators seeded with
    (seed, epoch) and (seed, epoch, rank): a resumed run, on any rank, sees the same batches with no
    generator state to carry."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        indices: Optional[torch.Tensor] = None,
        augment: str = "none",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.images = images  # stays where it is (a memory map): batches are gathered from it
        self.indices = indices
        self.labels = (labels if indices is None else labels[indices]).to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed, self.epoch = seed, 1
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per pass, over all ranks. A shuffled (training) pass leaves out a last batch of
        one: batch norm cannot normalise a single sample once a network has pooled it to 1x1."""
        count = len(self.labels)
        return count - 1 if self.shuffle and count > 1 and count % self.batch_size == 1 else count

    def set_epoch(self, epoch: int) -> None:
        """The epoch (from 1) whose shuffle and augmentation the next pass draws."""
        self.epoch = epoch

    def step_size(self, step: int) -> int:
        """Samples in global batch `step` (from 0), over all ranks."""
        return min(self.batch_size, self.num_samples - step * self.batch_size)

    def shares(self) -> Iterator[torch.Tensor]:
        """This rank's positions (into the loader's samples) in each batch of the epoch."""
        count = len(self.labels)
        shuffle = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(count, generator=shuffle) if self.shuffle else torch.arange(count)
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start : start + self.batch_size].tensor_split(self.world)[self.rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        draws = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank + 1))
        for index in self.shares():
            rows = index if self.indices is None else self.indices[index]
            batch = self.images[rows].to(device, non_blocking=True)
            yield augment_batch(batch, self.augment, draws), self.labels[index.to(device)]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A seed for one random stream of one epoch: the same on every run with `seed`."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # the same on every machine and Python


class Loaders(NamedTuple):
    train: TensorLoader
    val: TensorLoader
    test: TensorLoader


def validation_size(count: int, val_fraction: float) -> int:
    """How many of `count` training images are held out for validation; both parts keep one."""
    return min(max(1, round(count * val_fraction)), count - 1)


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/validation split; both parts keep at least one sample."""
    val_count = validation_size(count, val_fraction)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[val_count:], order[:val_count]


def make_loaders(
    dataset: DatasetRef,
    batch_size: int,
    val_fraction: float,
    seed: int,
    device: torch.device | str,
    augment: str = "none",
    rank: int = 0,
    world: int = 1,
) -> Loaders:
    """Train (shuffled, augmented), validation and test loaders over the prepared file; with `world`
    processes, each rank's loaders give it its share of every batch."""
    data = load_tensors(dataset.prepared_path)
    if len(data.train_labels) < 2:
        raise ValueError(f"{dataset.name}: need at least 2 training images to hold out validation")
    train, val = split_indices(len(data.train_labels), val_fraction, seed)
    images, labels = data.train_images, data.train_labels
    eval_batch = evaluation_batch(batch_size, images[0].numel())
    return Loaders(
        TensorLoader(images, labels, batch_size, True, seed, device, train, augment, rank, world),
        TensorLoader(images, labels, eval_batch, device=device, indices=val, rank=rank, world=world),
        make_test_loader(dataset, device, eval_batch),
    )


def evaluation_batch(batch_size: int, values_per_image: int) -> int:
    """Evaluation's batch: 256 small images, fewer large ones, never fewer than training's batch."""
    return max(batch_size, min(_EVAL_BATCH, _EVAL_BATCH_VALUES // values_per_image))


def make_test_loader(
    dataset: DatasetRef, device: torch.device | str, batch_size: Optional[int] = None
) -> TensorLoader:
    """The test split, in order (batches as evaluation_batch says unless given)."""
    data = load_tensors(dataset.prepared_path)
    batch_size = batch_size or evaluation_batch(1, data.test_images[0].numel())
    return TensorLoader(data.test_images, data.test_labels, batch_size, device=device)
