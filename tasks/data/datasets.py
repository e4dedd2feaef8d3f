"""Any dataset source becomes uint8 tensors on disk, described by a small DatasetRef.

Every prepared tensors file `X.pt` has a record `X.pt.json` beside it: the file's size and the
sha256 of its bytes. A run checks them before it uses the file and rebuilds a file that fails.
One record per file, rather than one per dataset, because a file's name already fixes its
content (it holds the data's digest): its record never changes, so concurrent runs of one
dataset, or of two csv datasets, never overwrite each other's. The record is written before the
file and torch.save's bytes are deterministic, so whichever writer's record a reader sees
matches whichever writer's file it sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from tasks.data.csv_images import load_csv_dataset
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageData, check_image_data
from tasks.data.mnist_files import (
    FIRST_MIRRORS,
    RAW_FILES,
    SOURCES,
    load_mnist_family,
    raw_files_stamp,
)
from tasks.data.offline_data import load_digits, make_synthetic
from tasks.files import atomic_output, atomic_save

_logger = logging.getLogger(__name__)
Logger = Union[logging.Logger, logging.LoggerAdapter]


@dataclass(frozen=True)
class DatasetRef:
    """What later steps need to know about a prepared dataset; small and serialisable."""

    name: str
    tensors_path: str
    sha256: str
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_origin: str  # where the data came from: a download URL, a CSV path or a generating function
    test_origin: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_source(
    name: str,
    data_dir: Path,
    mirror: Optional[str] = None,
    train_csv: Optional[Path] = None,
    test_csv: Optional[Path] = None,
    image_root: Optional[Path] = None,
    classes: Optional[list[str]] = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageData:
    """Reads (or downloads, or generates) the named dataset into memory."""
    if name in SOURCES:
        return load_mnist_family(name, data_dir, mirror)
    if name == "csv":
        return load_csv_dataset(train_csv, test_csv, image_root, classes, max_image_pixels)
    if name == "synthetic":
        return make_synthetic()
    if name == "digits":
        return load_digits()
    raise ValueError(
        f"unknown dataset {name!r}; choose one of {', '.join([*SOURCES, 'csv', 'synthetic', 'digits'])}"
    )


def data_origins(
    name: str, mirror: Optional[str] = None, train_csv: Optional[Path] = None, test_csv=None, **_
) -> tuple[str, str]:
    """Where the training and test images come from, for the run's dataset lineage."""
    if name in SOURCES:
        base = mirror.rstrip("/") + "/" if mirror else FIRST_MIRRORS[name]
        train_images, _, test_images, _ = RAW_FILES
        return f"{base}{train_images}.gz", f"{base}{test_images}.gz"
    if name == "csv":
        return str(train_csv), str(test_csv)
    generator = {"synthetic": make_synthetic, "digits": load_digits}[name]
    return (f"{generator.__module__}.{generator.__name__}",) * 2


def tensor_digest(data: ImageData) -> str:
    """sha256 over shapes, pixels, labels and class names, so any change to the data shows."""
    digest = hashlib.sha256()
    for tensor in data[:4]:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    digest.update("\n".join(data.class_names).encode())
    return digest.hexdigest()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    std = pixels.std(dim=1).clamp_min(1e-3)
    return tuple(pixels.mean(dim=1).tolist()), tuple(std.tolist())


def load_tensors(path: str) -> ImageData:
    """Maps tensors written by prepare_dataset (weights_only: no code runs on load); pages are
    read from disk only when used.

    Not checked against its record here: prepare_dataset checked it when the run chose it, and
    files are only ever replaced by rename, so a mapping keeps the bytes it was opened on."""
    return ImageData(**torch.load(path, weights_only=True, mmap=True))


def test_pixels(dataset: DatasetRef, limit: Optional[int] = None) -> torch.Tensor:
    """The first `limit` (default: all) test images as float32 pixels in [0, 1], the models' input."""
    return load_tensors(dataset.tensors_path).test_images[:limit].float() / 255


def prepare_dataset(name: str, data_dir: Path, logger: Optional[Logger] = None, **options) -> DatasetRef:
    """Loads, checks, fingerprints and stores a dataset under data_dir/prepared.

    `options` are load_source's: mirror, or train_csv, test_csv, image_root and classes. A
    FashionMNIST or MNIST copy prepared from the same raw files is reused without reading them.
    A prepared file that fails its size and digest check is rebuilt, with a warning to `logger`.
    """
    origins = dict(zip(("train_origin", "test_origin"), data_origins(name, **options)))
    stamp = raw_files_stamp(name, data_dir) if name in SOURCES else None
    manifest = data_dir / "prepared" / f"{name}.json"
    reused = reuse_prepared(manifest, stamp)
    if reused is not None:
        return DatasetRef(**reused, **origins)
    data = check_image_data(load_source(name, data_dir, **options))
    sha256 = tensor_digest(data)
    path = data_dir / "prepared" / f"{name}-{sha256[:16]}.pt"
    keep_or_store(data, path, logger or _logger)
    mean, std = channel_stats(data.train_images)
    ref = DatasetRef(
        name=name,
        tensors_path=str(path),
        sha256=sha256,
        class_names=tuple(data.class_names),
        channels=data.train_images.shape[1],
        image_size=tuple(data.train_images.shape[2:]),
        train_size=len(data.train_labels),
        test_size=len(data.test_labels),
        mean=mean,
        std=std,
        **origins,
    )
    stamp = raw_files_stamp(name, data_dir) if name in SOURCES else None  # downloaded by now
    if stamp is not None:
        with atomic_output(manifest) as out:
            described = {k: v for k, v in asdict(ref).items() if k not in origins}
            json.dump({"raw_files": stamp, "ref": described}, out)
    return ref


def keep_or_store(data: ImageData, path: Path, logger: Logger) -> None:
    """Keeps the file at `path` if it passes its check, else (re)writes it from `data`."""
    if path.exists():
        problem = tensors_file_problem(path)
        if problem is None:
            return
        logger.warning("prepared dataset %s is damaged (%s); rebuilding it from the source", path, problem)
    store_tensors(data, path)


def store_tensors(data: ImageData, path: Path) -> None:
    """Writes the record of `data`'s file, then the file, each atomically (record first: a reader
    that finds the file finds its record)."""
    sink = _HashingSink()
    torch.save(data._asdict(), sink)
    with atomic_output(record_path(path)) as out:
        json.dump({"bytes": sink.size, "sha256": sink.digest.hexdigest()}, out)
    atomic_save(data._asdict(), path)


def tensors_file_problem(path: Path) -> Optional[str]:
    """What is wrong with the prepared file at `path` by its record, or None if it matches."""
    try:
        recorded = json.loads(record_path(path).read_text())
        size, sha256 = int(recorded["bytes"]), str(recorded["sha256"])
    except FileNotFoundError:
        return f"no record {record_path(path).name} of its size and digest"
    except (ValueError, KeyError, TypeError):
        return f"unreadable record {record_path(path).name}"
    actual = path.stat().st_size
    if actual != size:  # a truncated file costs a stat, not a hash
        return f"{actual} bytes, {size} recorded"
    with open(path, "rb") as handle:
        if hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
            return "its sha256 differs from the recorded one"
    return None


def record_path(path: Path) -> Path:
    """Where the size and digest of the prepared file `path` are recorded."""
    return path.with_name(path.name + ".json")


class _HashingSink:
    """A write-only file for torch.save that keeps only the size and sha256 of what it is given."""

    def __init__(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass


def reuse_prepared(manifest: Path, stamp: Optional[list]) -> Optional[dict]:
    """The DatasetRef fields `manifest` recorded, if it was made from the raw files `stamp`
    describes and its tensors file passes its check; else None (and prepare_dataset, finding
    the same file again, says what was wrong with it)."""
    if stamp is None or not manifest.exists():
        return None
    try:
        recorded = json.loads(manifest.read_text())
        ref = recorded["ref"]
        tensors = Path(ref["tensors_path"])
        if recorded["raw_files"] != [list(entry) for entry in stamp]:
            return None
        if not tensors.exists() or tensors_file_problem(tensors) is not None:
            return None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable or from another version: prepare again
    return {
        **ref,
        "class_names": tuple(ref["class_names"]),
        "image_size": tuple(ref["image_size"]),
        "mean": tuple(ref["mean"]),
        "std": tuple(ref["std"]),
    }
