"""The notes' CustomImageDataset: a CSV of (image path relative to a root, label) rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from tasks.data.images import ImageData

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class CsvDatasetError(ValueError):
    """A CSV row names a missing or unreadable image, or an unknown label."""


class Row(NamedTuple):
    line: int
    path: Path
    label: str


def read_rows(csv_path: Path, image_root: Path, labels_required: bool = True) -> list[Row]:
    """Parses a CSV, skipping a header row, and checks every named image exists.

    Without `labels_required`, the label column may be absent or empty (label "").
    """
    rows = list(iter_rows(csv_path, image_root, labels_required))
    if not rows:
        raise CsvDatasetError(f"{csv_path}: no image rows")
    return rows


def iter_rows(csv_path: Path, image_root: Path, labels_required: bool = True) -> Iterator[Row]:
    """read_rows one row at a time, so a CSV of any length streams."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        first = True
        for number, cells in enumerate(csv.reader(handle), 1):
            if not any(cells):
                continue
            if first and Path(cells[0].strip()).suffix.lower() not in IMAGE_SUFFIXES:
                first = False
                continue  # a header such as "image,label"
            first = False
            label = cells[1].strip() if len(cells) > 1 else ""
            where = f"{csv_path} row {number}"
            if labels_required and not label:
                raise CsvDatasetError(f"{where}: expected 'image path,label', got {cells!r}")
            path = image_root / cells[0].strip()
            if not path.is_file():
                raise CsvDatasetError(f"{where}: image {cells[0].strip()!r} not found under {image_root}")
            yield Row(number, path, label)


def label_set(labels: list[str]) -> tuple[str, ...]:
    """Distinct labels in index order: numeric order when all are integers, else text order."""
    distinct = set(labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def encode_labels(rows: list[Row], classes: tuple[str, ...], csv_path: Path) -> torch.Tensor:
    """Maps labels to indices; a label outside `classes` is an error naming its row."""
    index = {name: i for i, name in enumerate(classes)}
    for row in rows:
        if row.label not in index:
            raise CsvDatasetError(
                f"{csv_path} row {row.line}: label {row.label!r} is not in the label set {list(classes)}"
            )
    return torch.tensor([index[row.label] for row in rows], dtype=torch.int64)


def decode_rows(rows: list[Row], csv_path: Path) -> list[torch.Tensor]:
    """Decodes every image to uint8 (C, H, W), dropping any alpha channel."""
    from torchvision.io import ImageReadMode, decode_image  # a seconds-long import, only for CSV data

    images = []
    for row in rows:
        try:
            image = decode_image(str(row.path), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError) as error:
            raise CsvDatasetError(f"{csv_path} row {row.line}: cannot decode {row.path}: {error}") from error
        images.append(image[:3] if image.shape[0] == 4 else image[:1] if image.shape[0] == 2 else image)
    return images


def stack_images(
    images: list[torch.Tensor], rows: list[Row], shape: tuple[int, int, int], csv_path: Path
) -> torch.Tensor:
    """Stacks images into (N, C, H, W) of `shape`, widening grey to RGB where C is 3."""
    channels, size = shape[0], shape[1:]
    for image, row in zip(images, rows):
        if image.shape[1:] != size:
            raise CsvDatasetError(
                f"{csv_path} row {row.line}: image is {tuple(image.shape[1:])} pixels, "
                f"expected {tuple(size)} like the first training image; all images must share one size"
            )
    return torch.stack([image.expand(channels, -1, -1) for image in images]).contiguous()


def load_csv_dataset(
    train_csv: Path, test_csv: Path, image_root: Path, classes: Optional[list[str]] = None
) -> ImageData:
    """Reads both CSVs, validating every row before decoding any image."""
    train_rows, test_rows = read_rows(train_csv, image_root), read_rows(test_csv, image_root)
    names = tuple(classes) if classes else label_set([row.label for row in train_rows])
    train_labels = encode_labels(train_rows, names, train_csv)
    test_labels = encode_labels(test_rows, names, test_csv)
    train_images, test_images = decode_rows(train_rows, train_csv), decode_rows(test_rows, test_csv)
    channels = max(image.shape[0] for image in train_images + test_images)
    shape = (channels, *train_images[0].shape[1:])
    return ImageData(
        stack_images(train_images, train_rows, shape, train_csv),
        train_labels,
        stack_images(test_images, test_rows, shape, test_csv),
        test_labels,
        names,
    )
