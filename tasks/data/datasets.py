"""Any data source (tasks.data.sources) becomes one prepared file of uint8 images
(tasks.data.prepared), in one preprocessing (channels, size, resize mode), described by a small
DatasetRef.

A prepared file is named by the digest of its data, so two runs of one dataset write the same
bytes to the same name, and a finished file is only ever replaced by rename. A manifest keyed by
what the data was made from (raw files, listed photos, preprocessing) lets a later run reuse a
prepared file without reading its sources again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from common.files import atomic_output
from tasks.data import prepared
from tasks.data.decoding import Preprocessing
from tasks.data.images import ImageData
from tasks.data.sources import DataSource, Shape
from tasks.data.storing import Logger, Source, channel_stats, store

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetRef:
    """What later steps need to know about a prepared dataset; small and serialisable."""

    name: str
    prepared_path: str
    sha256: str
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_origin: str  # where the data came from: a download URL, a CSV, a folder or a function
    test_origin: str
    resize_mode: str = "crop"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocessing(self) -> Preprocessing:
        """How any image becomes this dataset's pixels (and a model's input)."""
        return Preprocessing(self.channels, self.image_size, self.resize_mode)


def tensor_digest(data: ImageData) -> str:
    """sha256 over shapes, pixels, labels and class names, so any change to the data shows (what
    tasks.data.prepared.digests computes from a prepared file)."""
    digest = hashlib.sha256()
    for tensor in data[:4]:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    digest.update("\n".join(data.class_names).encode())
    return digest.hexdigest()


def load_tensors(path: str) -> ImageData:
    """Maps a prepared file (tasks.data.prepared.open_file): pages are read only when used.

    Not checked against its record here: prepare_dataset checked it when the run chose it, and
    files are only ever replaced by rename, so a mapping keeps the bytes it was opened on."""
    return prepared.open_file(path)


def test_images(dataset: DatasetRef, limit: Optional[int] = None) -> torch.Tensor:
    """The first `limit` (default: all) test images, uint8 and memory-mapped."""
    return load_tensors(dataset.prepared_path).test_images[:limit]


def test_pixels(dataset: DatasetRef, limit: Optional[int] = None) -> torch.Tensor:
    """The first `limit` (default: all) test images as float32 pixels in [0, 1], the models' input."""
    return test_images(dataset, limit).float() / 255


def prepare_dataset(
    source: DataSource,
    data_dir: Path,
    logger: Optional[Logger] = None,
    shape: Shape = Shape(),
    workers: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
) -> DatasetRef:
    """Lists or loads `source`, checks, preprocesses, fingerprints and stores it under
    data_dir/prepared, in `shape`.

    Photos are decoded by `workers` processes, with `progress(images, total)` after each chunk. A
    copy prepared from the same sources with the same preprocessing is reused without reading them;
    one that fails its size and digest check is rebuilt, with a warning to `logger`."""
    logger, folder = logger or _logger, data_dir / "prepared"
    plan = source.plan(data_dir, shape, workers, progress)
    key, (train_origin, test_origin) = plan.key(), plan.origins
    reused = reuse_prepared(folder / f"{source.name}-{key[:16]}.json" if key else None)
    if reused is not None:
        return DatasetRef(**reused, train_origin=train_origin, test_origin=test_origin)
    contents = plan.contents()
    ref = describe(source.name, *store(source.name, folder, contents, logger), contents, plan.origins)
    key = key or plan.key()  # raw files downloaded just now have one
    if key:
        with atomic_output(folder / f"{source.name}-{key[:16]}.json") as out:
            json.dump({k: v for k, v in asdict(ref).items() if not k.endswith("_origin")}, out)
    return ref


def describe(name: str, path: Path, sha256: str, source: Source, origins: tuple[str, str]) -> DatasetRef:
    """The DatasetRef of a stored source."""
    prep = source.prep
    mean, std = channel_stats(prepared.open_file(path).train_images)
    return DatasetRef(
        name=name,
        prepared_path=str(path),
        sha256=sha256,
        class_names=tuple(source.class_names),
        channels=prep.channels,
        image_size=tuple(prep.size),
        train_size=len(source.train_labels),
        test_size=len(source.test_labels),
        mean=mean,
        std=std,
        train_origin=origins[0],
        test_origin=origins[1],
        resize_mode=prep.resize_mode,
    )


def reuse_prepared(manifest: Optional[Path]) -> Optional[dict]:
    """The DatasetRef fields `manifest` recorded, if its prepared file passes its check; else None
    (and prepare_dataset, finding the same file again, says what was wrong with it)."""
    if manifest is None or not manifest.exists():
        return None
    try:
        ref = json.loads(manifest.read_text())
        path = Path(ref["prepared_path"])
        if not path.exists() or prepared.file_problem(path) is not None:
            return None
        return {
            **ref,
            "class_names": tuple(ref["class_names"]),
            "image_size": tuple(ref["image_size"]),
            "mean": tuple(ref["mean"]),
            "std": tuple(ref["std"]),
        }
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: prepare again
