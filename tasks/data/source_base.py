"""What every data source is: a frozen, typed description of where a dataset's images come from,
whose settings are checked when it is made, and which lists or loads them for
tasks.data.datasets.prepare_dataset.

Two families share the work: in-memory sources (FashionMNIST and MNIST files, generated data) load
whole tensors; photo sources (a CSV, a class-folder tree) list files, check every header, and have
worker processes decode them straight into the prepared file. A source's paths are kept as given
and made absolute in the process that reads them (a sweep's worker resolves a relative one in its
own working directory)."""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from tasks.data.decoding import Preprocessing
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageData, check_image_data
from tasks.data.photos import Listing
from tasks.data.storing import Source, memory_source, photo_source

Progress = Optional[Callable[[int, int], None]]  # (images done, total) while photos are decoded


@dataclass(frozen=True)
class Shape:
    """The preprocessing a run asks for; None and "auto" take the source's own: its images' size
    when they share one, and colour when any image has it."""

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
class Plan:
    """How prepare_dataset reaches a source's prepared file."""

    origins: tuple[str, str]  # where the training and test images come from, for the lineage
    key: Callable[[], Optional[str]]  # what the data is made from, and how; None while not known
    contents: Callable[[], Source]  # reads the source: what its prepared file will hold


class DataSource(BaseModel):
    """A dataset to train on, told apart by `name`; its other fields are its settings, and those
    that name files carry common.path_settings.PATH."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str

    @abstractmethod
    def plan(self, data_dir: Path, shape: Shape, workers: int, progress: Progress) -> Plan:
        """What preparing this source in `shape` takes: photos are listed (and their headers
        checked) now, and decoded by `workers` processes when the plan's contents are read."""

    def default_augment(self, channels: int) -> str:
        """What --augment auto runs on this source's images of `channels`: nothing, since flips and
        crops change what a digit or a centred pattern is."""
        return "none"


class MemorySource(DataSource):
    """A dataset loaded whole into memory: read from files (downloaded when missing) or generated."""

    @abstractmethod
    def load(self, data_dir: Path) -> ImageData:
        """Both splits, with their class names."""

    @abstractmethod
    def origins(self) -> tuple[str, str]:
        """Where the training and test images come from: download URLs, or the generating function."""

    def made_from(self, data_dir: Path) -> Optional[object]:
        """A stamp of the files the data is read from, or None when there is none: generated data
        is made again each time, and files not downloaded yet have no stamp."""
        return None

    def plan(self, data_dir: Path, shape: Shape, workers: int, progress: Progress) -> Plan:
        def key() -> Optional[str]:
            made_from = self.made_from(data_dir)
            return stamp(made_from, shape) if made_from else None

        def contents() -> Source:
            data = check_image_data(self.load(data_dir))
            first = data.train_images.shape  # every image of a tensor shares one size and mode
            return memory_source(data, shape.resolve(frozenset([tuple(first[2:])]), first[1] == 3))

        return Plan(self.origins(), key, contents)


class PhotoSource(DataSource):
    """Image files listed with their labels, every header checked before anything is decoded."""

    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Refuse an image whose header declares more pixels than this, before decoding it.",
    )

    @abstractmethod
    def list_photos(self) -> Listing:
        """The files of both splits with their labels, every header checked."""

    def default_augment(self, channels: int) -> str:
        """A random resized crop, flip and colour jitter for colour photos; nothing for grey ones."""
        return "standard" if channels == 3 else "none"

    def plan(self, data_dir: Path, shape: Shape, workers: int, progress: Progress) -> Plan:
        listing = self.list_photos()
        prep = shape.resolve(listing.sizes, listing.colour)
        key = stamp(listing.stamp, prep)

        def contents() -> Source:
            return photo_source(listing, prep, workers, self.max_image_pixels, progress)

        return Plan((listing.train_origin, listing.test_origin), lambda: key, contents)


def stamp(made_from: object, how: object) -> str:
    """A key for what a prepared copy was made from and how."""
    return hashlib.sha256(json.dumps([made_from, repr(how)], default=str).encode()).hexdigest()


def function_origin(function: Callable) -> str:
    """The origin of generated data: the dotted name of the function that makes it."""
    return f"{function.__module__}.{function.__name__}"


def source_name(source_class: type[DataSource]) -> str:
    """The name that picks `source_class` (--dataset NAME)."""
    return source_class.model_fields["name"].default
