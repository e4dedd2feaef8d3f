"""How a dataset's images reach its prepared file: from memory or from listed photos, written to a
temporary file, named by the digest of the data and published by rename."""

from __future__ import annotations

import logging
import os
import secrets
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from tasks.data import prepared
from tasks.data.decoding import Preprocessing, preprocess
from tasks.data.images import ImageData
from tasks.data.photo_writer import write_listing
from tasks.data.photos import Listing

Logger = Union[logging.Logger, logging.LoggerAdapter]
_CHUNK_VALUES = 1 << 22  # pixel values per step when copying or summarising a split (32 MB as float64)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale, a chunk at a time (float64
    sums), so a memory-mapped split is read once and never copied whole."""
    channels = images.shape[1]
    total, squares, count = (
        torch.zeros(channels, dtype=torch.float64),
        torch.zeros(channels, dtype=torch.float64),
        0,
    )
    step = chunk_size(images)
    for start in range(0, len(images), step):
        pixels = images[start : start + step].transpose(0, 1).reshape(channels, -1).double() / 255
        total += pixels.sum(1)
        squares += (pixels * pixels).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = ((squares - count * mean * mean) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def chunk_size(images: torch.Tensor) -> int:
    """Images per step, so a step's values stay within _CHUNK_VALUES whatever the image size."""
    return max(1, _CHUNK_VALUES // max(1, images[0].numel()))


@dataclass(frozen=True)
class Source:
    """What a prepared file will hold, and how to fill in its images."""

    class_names: tuple[str, ...]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    prep: Preprocessing
    fill: Callable[[Path, prepared.Layout], None]


def photo_source(
    listing: Listing,
    prep: Preprocessing,
    workers: int,
    max_pixels: Optional[int],
    progress: Optional[Callable[[int, int], None]],
) -> Source:
    """Listed photos, decoded and resized by `workers` processes into the file."""
    limit = {"max_pixels": max_pixels} if max_pixels else {}
    total = len(listing.train[0]) + len(listing.test[0])
    on_chunk = (lambda images: progress(images, total)) if progress else None

    def fill(path: Path, layout: prepared.Layout) -> None:
        write_listing(path, layout, listing, prep, workers, on_chunk=on_chunk, **limit)

    labels = [torch.tensor(split[1], dtype=torch.int64) for split in (listing.train, listing.test)]
    return Source(listing.class_names, *labels, prep, fill)


def memory_source(data: ImageData, prep: Preprocessing) -> Source:
    """An in-memory dataset, brought to `prep` a chunk at a time where its images differ."""

    def fill(path: Path, layout: prepared.Layout) -> None:
        for split in ("train", "test"):
            images = getattr(data, f"{split}_images")
            step = chunk_size(images)
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                if tuple(chunk.shape[1:]) != (prep.channels, *prep.size):
                    chunk = torch.stack([preprocess(image, prep) for image in chunk])
                prepared.write_images(path, layout, split, start, chunk)

    return Source(data.class_names, data.train_labels, data.test_labels, prep, fill)


def store(name: str, folder: Path, source: Source, logger: Logger) -> tuple[Path, str]:
    """Writes `source` to a temporary file, names it by its data's digest and publishes it, unless
    a sound file of that name is there already (a damaged one is replaced, with a warning).
    Returns the file and the data's sha256."""
    prep = source.prep
    layout = prepared.plan_layout(
        source.class_names, len(source.train_labels), len(source.test_labels), (prep.channels, *prep.size)
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        prepared.create_file(tmp, layout, source.train_labels, source.test_labels)
        source.fill(tmp, layout)
        file_sha256, sha256 = prepared.digests(tmp, layout)
        path = folder / f"{name}-{sha256[:16]}{prepared.SUFFIX}"
        problem = prepared.file_problem(path) if path.exists() else None
        if problem is not None:
            logger.warning(
                "prepared dataset %s is damaged (%s); rebuilding it from the source", path, problem
            )
        if problem is not None or not path.exists():
            prepared.publish(tmp, path, file_sha256)
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path, sha256
