"""The notes' CustomImageDataset: a CSV of (image path relative to a root, label) rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, ImageHeader, check_image_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class CsvDatasetError(ValueError):
    """A CSV cannot be read, or a row names a missing, outside or unreadable image, or an unknown label."""


class Row(NamedTuple):
    line: int
    path: Path
    label: str
    header: Optional[ImageHeader] = None  # the image's format and size, as its header declares


def read_rows(
    csv_path: Path, image_root: Path, labels_required: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Row]:
    """Parses a CSV, skipping a header row, and checks every named image: under `image_root`, and
    from its header a PNG, JPEG, GIF or WebP of at most `max_pixels` pixels.

    Without `labels_required`, the label column may be absent or empty (label "").
    """
    rows = list(iter_rows(csv_path, image_root, labels_required, max_pixels))
    if not rows:
        raise CsvDatasetError(
            f"{csv_path}: no image rows (empty, or only a header); expected {_expected(labels_required)}"
        )
    return rows


def iter_rows(
    csv_path: Path, image_root: Path, labels_required: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Row]:
    """read_rows one row at a time, so a CSV of any length streams."""
    root, number, first = image_root.resolve(), 0, True
    try:
        handle = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise CsvDatasetError(f"{csv_path}: cannot open the CSV: {error.strerror or error}") from None
    try:
        with handle:
            for number, cells in enumerate(csv.reader(handle), 1):
                cells = [cell.strip() for cell in cells]
                if not any(cells):
                    continue
                where = f"{csv_path} row {number}"
                if first and Path(cells[0]).suffix.lower() not in IMAGE_SUFFIXES:
                    check_header(cells, where, labels_required)  # a header such as "image,label"
                else:
                    yield check_row(cells, where, number, root, labels_required, max_pixels)
                first = False
    except UnicodeDecodeError as error:
        bad = error.object[error.start]
        raise CsvDatasetError(
            f"{csv_path}: not UTF-8 text (byte {bad:#04x}: {error.reason}); save the CSV as UTF-8"
        ) from None
    except csv.Error as error:
        raise CsvDatasetError(f"{csv_path} row {number + 1}: not readable as CSV: {error}") from None


def _expected(labels_required: bool) -> str:
    return "'image path,label' rows" if labels_required else "'image path[,label]' rows"


def check_header(cells: list[str], where: str, labels_required: bool) -> None:
    """A header names each column once: the image path, then the label (optional when predicting)."""
    repeated = sorted({cell for cell in cells if cell and cells.count(cell) > 1})
    if repeated:
        raise CsvDatasetError(
            f"{where}: header {cells!r} repeats column {repeated[0]!r}; expected {_expected(labels_required)}"
        )
    if labels_required and (len(cells) < 2 or not cells[1]):
        raise CsvDatasetError(f"{where}: header {cells!r} has no label column; expected {_expected(True)}")
    if any(cells[2:]):
        raise CsvDatasetError(
            f"{where}: header {cells!r} has more than two columns; expected {_expected(labels_required)}"
        )


def check_row(
    cells: list[str], where: str, number: int, root: Path, labels_required: bool, max_pixels: int
) -> Row:
    """One data row as a Row, once its image is known to be a file under `root` with a sound header."""
    label = cells[1] if len(cells) > 1 else ""
    if (labels_required and not label) or any(cells[2:]):
        raise CsvDatasetError(f"{where}: expected {_expected(labels_required)}, got {cells!r}")
    path = root / cells[0]
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise CsvDatasetError(f"{where}: image {cells[0]!r} cannot be resolved: {error}") from None
    if not resolved.is_relative_to(root):
        raise CsvDatasetError(
            f"{where}: image {cells[0]!r} resolves to {str(resolved)!r}, outside the image root {root} "
            "(--image-root); image paths, symlinks included, must stay under it"
        )
    if not resolved.is_file():
        raise CsvDatasetError(f"{where}: image {cells[0]!r} not found under {root}")
    try:
        header = check_image_file(resolved, max_pixels)
    except ImageFileError as error:
        raise CsvDatasetError(f"{where}: image {cells[0]!r}: {error}") from None
    return Row(number, path, label, header)


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
