"""What to predict: a CSV, a folder or a dataset's test split, described without its pixels and
cut into partitions that decode themselves a batch at a time."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch

from tasks.data.csv_images import IMAGE_SUFFIXES, CsvDatasetError, Row, iter_rows
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.decoding import Preprocessing, load_image
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, ImageHeader, check_image_file


class PredictionError(ValueError):
    """The model, alias or images asked for cannot be used."""


Size = tuple[int, int]  # (height, width)
Batch = tuple[list[str], list[Optional[str]], list[torch.Tensor]]  # sources, labels, uint8 images


@dataclass(frozen=True)
class Inputs:
    """Images start..stop of a CSV, a folder or a dataset's test split, described without their
    pixels (nor, for a CSV, their names), so a part is small enough to send to any worker."""

    kind: Literal["csv", "folder", "dataset"]
    origin: str  # the CSV, the folder, or the dataset's prepared tensors
    start: int
    stop: int
    image_root: Optional[str] = None  # csv: the folder its paths are relative to
    names: tuple[str, ...] = ()  # folder: the file names of images start..stop
    dataset: str = ""  # dataset: its name
    class_names: tuple[str, ...] = ()  # dataset: its label names
    max_pixels: int = DEFAULT_MAX_PIXELS  # csv, folder: files declaring more pixels are refused undecoded

    def __len__(self) -> int:
        return self.stop - self.start

    def part(self, begin: int, end: int) -> "Inputs":
        """Images begin..end of these (clipped, like a slice)."""
        begin, end = min(begin, len(self)), min(end, len(self))
        return replace(self, start=self.start + begin, stop=self.start + end, names=self.names[begin:end])

    def batches(self, size: int, prep: Preprocessing) -> Iterator[Batch]:
        """Decodes the images `size` at a time, in order, files straight into `prep`'s shape."""
        if self.kind == "dataset":
            data = load_tensors(self.origin)
            for begin in range(self.start, self.stop, size):
                end = min(begin + size, self.stop)
                labels = [self.class_names[k] for k in data.test_labels[begin:end].tolist()]
                sources = [f"{self.dataset}/test/{i}" for i in range(begin, end)]
                yield sources, labels, list(data.test_images[begin:end])
            return
        if self.kind == "csv":
            rows = iter_rows(Path(self.origin), Path(self.image_root), False, self.max_pixels)
            rows = itertools.islice(rows, self.start, self.stop)
        else:
            folder = Path(self.origin)
            rows = (Row(self.start + i + 1, folder / name, "") for i, name in enumerate(self.names))
        while chunk := list(itertools.islice(rows, size)):
            images = [self._load(row, prep) for row in chunk]
            yield [str(row.path) for row in chunk], [row.label or None for row in chunk], images

    def _load(self, row: Row, prep: Preprocessing) -> torch.Tensor:
        try:
            return load_image(row.path, prep, self.max_pixels)
        except ImageFileError as error:
            raise CsvDatasetError(f"{self.origin} row {row.line}: {row.path}: {error}") from None


def csv_inputs(
    csv_path: Path,
    image_root: Path,
    class_names: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: Optional[Size] = None,
) -> Inputs:
    """Images named by a CSV (labels optional): every row and image header is checked (against
    `size` too, when given), none is kept in memory."""
    count, labels = 0, set()
    for row in iter_rows(csv_path, image_root, False, max_pixels):
        check_size(row.header, str(row.path), size)
        count += 1
        labels.add(row.label or None)
    if not count:
        raise PredictionError(
            f"{csv_path}: no image rows (empty, or only a header); expected 'image path[,label]' rows"
        )
    check_labels(labels, class_names)
    return Inputs("csv", str(csv_path), 0, count, image_root=str(image_root), max_pixels=max_pixels)


def folder_inputs(folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS, size: Optional[Size] = None) -> Inputs:
    """Every image file directly in `folder`, in name order, each checked from its header (against
    `size` too, when given)."""
    if not folder.is_dir():
        raise PredictionError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise PredictionError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    for path in files:
        try:
            header = check_image_file(path, max_pixels)
        except ImageFileError as error:
            raise PredictionError(f"{path}: {error}") from None
        check_size(header, str(path), size)
    names = tuple(path.name for path in files)
    return Inputs("folder", str(folder), 0, len(names), names=names, max_pixels=max_pixels)


def dataset_inputs(
    name: str, data_dir: Path, class_names: Sequence[str], mirror: Optional[str] = None
) -> Inputs:
    """The test split of a named dataset, labelled."""
    dataset = prepare_dataset(name, data_dir, mirror=mirror)
    check_labels(set(dataset.class_names), class_names)
    return Inputs(
        "dataset", dataset.prepared_path, 0, dataset.test_size, dataset=name, class_names=dataset.class_names
    )


def check_size(header: ImageHeader, source: str, size: Optional[Size]) -> None:
    """Refuses an image whose header declares another size than `size` (None: any size will do)."""
    if size is not None and (header.height, header.width) != tuple(size):
        raise size_error(source, (header.height, header.width), size)


def size_error(source: str, actual: Size, size: Size) -> PredictionError:
    return PredictionError(
        f"{source}: image is {tuple(actual)} pixels, the model takes {tuple(size)} (height, width); "
        "prediction resizes images as training did unless --no-resize is given"
    )


def check_labels(labels: set[Optional[str]], class_names: Sequence[str]) -> None:
    """Fails before any prediction when a known label is not one of the model's classes."""
    unknown = labels - {None} - set(class_names)
    if unknown:
        raise PredictionError(
            f"labels {sorted(unknown)} are not among the model's classes {list(class_names)}"
        )


def partitions(inputs: Inputs, size: int) -> list[Inputs]:
    """Consecutive parts of at most `size` images, in input order."""
    return [inputs.part(start, start + size) for start in range(0, len(inputs), size)]
