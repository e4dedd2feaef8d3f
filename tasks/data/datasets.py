"""Any dataset source becomes one prepared file of uint8 images (tasks.data.prepared), in one
preprocessing (channels, size, resize mode), described by a small DatasetRef.

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
from common.redaction import redact_url
from tasks.data import prepared
from tasks.data.decoding import Preprocessing
from tasks.data.images import ImageData, check_image_data
from tasks.data.mnist_files import FIRST_MIRRORS, RAW_FILES, SOURCES, load_mnist_family, raw_files_stamp
from tasks.data.offline_data import load_digits, make_synthetic
from tasks.data.photos import list_csv, list_folder
from tasks.data.storing import Logger, Source, channel_stats, memory_source, photo_source, store

_logger = logging.getLogger(__name__)
PHOTO_SOURCES = ("csv", "folder")
IN_MEMORY = (*SOURCES, "synthetic", "digits")


@dataclass(frozen=True)
class Shape:
    """The preprocessing a run asks for; None and "auto" are decided from the images."""

    channels: str = "auto"  # auto, 1 or 3: auto is 3 when any image has colour
    size: Optional[tuple[int, int]] = None  # default: the images' common size, else `fallback`
    resize_mode: str = "crop"
    fallback: int = 128  # the size when images differ (224 for pretrained backbones)

    def resolve(self, sizes: frozenset[tuple[int, int]], colour: bool) -> Preprocessing:
        """The one preprocessing for images of these sizes and colour."""
        channels = (3 if colour else 1) if self.channels == "auto" else int(self.channels)
        size = self.size or (next(iter(sizes)) if len(sizes) == 1 else (self.fallback, self.fallback))
        return Preprocessing(channels, tuple(size), self.resize_mode)


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


def load_source(name: str, data_dir: Path, mirror: Optional[str] = None, **_) -> ImageData:
    """Reads (or downloads, or generates) an in-memory dataset."""
    if name in SOURCES:
        return load_mnist_family(name, data_dir, mirror)
    if name == "synthetic":
        return make_synthetic()
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join([*IN_MEMORY, *PHOTO_SOURCES])}")


def list_photos(name: str, test_fraction: float = 0.2, max_image_pixels: Optional[int] = None, **paths):
    """The csv or folder dataset's files, listed and header-checked."""
    limit = {"max_pixels": max_image_pixels} if max_image_pixels else {}
    if name == "csv":
        keys = ("train_csv", "test_csv", "image_root", "classes")
        return list_csv(**{key: paths.get(key) for key in keys}, **limit)
    return list_folder(paths["train_dir"], paths.get("test_dir"), test_fraction, **limit)


def data_origins(name: str, mirror: Optional[str] = None) -> tuple[str, str]:
    """Where an in-memory dataset's training and test images come from, for the lineage."""
    if name in SOURCES:
        base = redact_url(mirror).rstrip("/") + "/" if mirror else FIRST_MIRRORS[name]  # it reaches MLflow
        train_images, _, test_images, _ = RAW_FILES
        return f"{base}{train_images}.gz", f"{base}{test_images}.gz"
    generator = {"synthetic": make_synthetic, "digits": load_digits}[name]
    return (f"{generator.__module__}.{generator.__name__}",) * 2


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
    name: str,
    data_dir: Path,
    logger: Optional[Logger] = None,
    shape: Shape = Shape(),
    workers: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
    **options,
) -> DatasetRef:
    """Loads, checks, preprocesses, fingerprints and stores a dataset under data_dir/prepared.

    `options` are the source's: mirror; train_csv, test_csv, image_root, classes; train_dir,
    test_dir, test_fraction; max_image_pixels. Photos are decoded by `workers` processes, with
    `progress(images, total)` after each chunk. A copy prepared from the same sources with the same
    preprocessing is reused without reading them; one that fails its size and digest check is
    rebuilt, with a warning to `logger`."""
    logger, folder = logger or _logger, data_dir / "prepared"
    if name in PHOTO_SOURCES:
        listing = list_photos(name, **options)
        prep = shape.resolve(listing.sizes, listing.colour)
        origins = (listing.train_origin, listing.test_origin)
        key: Optional[str] = _stamp(listing.stamp, prep)

        def make_source() -> Source:
            return photo_source(listing, prep, workers, options.get("max_image_pixels"), progress)
    else:
        origins = data_origins(name, options.get("mirror"))
        key = _memory_key(name, data_dir, shape)

        def make_source() -> Source:
            data = check_image_data(load_source(name, data_dir, **options))
            first = data.train_images.shape
            return memory_source(data, shape.resolve(frozenset([tuple(first[2:])]), first[1] == 3))

    reused = reuse_prepared(folder / f"{name}-{key[:16]}.json" if key else None)
    if reused is not None:
        return DatasetRef(**reused, train_origin=origins[0], test_origin=origins[1])
    source = make_source()
    ref = describe(name, *store(name, folder, source, logger), source, origins)
    key = key or _memory_key(name, data_dir, shape)  # raw files downloaded just now have one
    if key:
        with atomic_output(folder / f"{name}-{key[:16]}.json") as out:
            json.dump({k: v for k, v in asdict(ref).items() if not k.endswith("_origin")}, out)
    return ref


def _memory_key(name: str, data_dir: Path, shape: Shape) -> Optional[str]:
    """The manifest key of an in-memory dataset: its raw files (FashionMNIST, MNIST) and the asked
    shape; None for generated data (regenerated each time) and raw files not downloaded yet."""
    raw = raw_files_stamp(name, data_dir) if name in SOURCES else None
    return _stamp(raw, shape) if raw else None


def _stamp(made_from: object, prep: object) -> str:
    """A key for what a prepared copy was made from and how."""
    return hashlib.sha256(json.dumps([made_from, repr(prep)], default=str).encode()).hexdigest()


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
