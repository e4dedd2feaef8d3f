"""The notes' CustomImageDataset: a CSV of (image path relative to a root, label) rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

from common.errors import UserError
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, ImageHeader, check_image_file, open_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})  # what the decoder reads
ACCEPTED_FORMATS = "PNG, JPEG, GIF or WebP (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")"
# Image formats the decoder does not read: a row naming one is refused, naming the formats it reads.
OTHER_IMAGE_SUFFIXES = frozenset(
    {".bmp", ".dib", ".tif", ".tiff", ".ico", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ppm", ".pgm"}
    | {".pbm", ".pnm", ".tga", ".psd", ".svg", ".raw", ".dng", ".cr2", ".nef"}
)
_ROW_SUFFIXES = IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES  # a first row naming one is not a header
_BOM = b"\xef\xbb\xbf"


class CsvDatasetError(UserError, ValueError):
    """A CSV cannot be read, or a row names a missing, outside or unreadable image, or an unknown label."""


class Row(NamedTuple):
    line: int
    path: Path
    label: str
    header: Optional[ImageHeader] = None  # the image's format and size, as its header declares
    offset: int = 0  # where the row's record starts in the CSV, in bytes


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
    csv_path: Path,
    image_root: Path,
    labels_required: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    start: Optional[tuple[int, int]] = None,
    check_files: bool = True,
) -> Iterator[Row]:
    """read_rows one row at a time, so a CSV of any length streams.

    With `start` (a row's `offset`, and its `line` - 1), reading begins at that row of a CSV already
    listed, with no header to look for. Without `check_files`, rows are checked but not their images:
    for a reader that checks each image as it decodes it, through the same open file."""
    root, first = image_root.resolve(), start is None
    offset, number = start or (0, 0)
    for number, offset, cells in _records(csv_path, offset, number):
        if not any(cells):
            continue
        where = f"{csv_path} row {number}"
        if first and Path(cells[0]).suffix.lower() not in _ROW_SUFFIXES:
            check_header(cells, where, labels_required)  # a header such as "image,label"
        else:
            row = parse_row(cells, where, number, root, labels_required)._replace(offset=offset)
            if check_files:
                row = row._replace(header=check_image(row, cells[0], where, root, max_pixels))
            yield row
        first = False


def _records(csv_path: Path, offset: int, number: int) -> Iterator[tuple[int, int, list[str]]]:
    """(record number, byte offset where the record starts, its stripped cells) from `offset` on,
    numbered after `number`. Lines are read as bytes, so offsets are exact; a quoted field may span
    lines, and a UTF-8 byte order mark at the start of the file is dropped."""
    try:
        handle = open(csv_path, "rb")
    except OSError as error:
        raise CsvDatasetError(f"{csv_path}: cannot open the CSV: {error.strerror or error}") from None
    read = [offset]  # bytes of the file the csv reader has taken so far

    def lines() -> Iterator[str]:
        for raw in handle:
            for line in raw.splitlines(keepends=True):  # "\r" ends a line too, as text mode reads it
                text = line[len(_BOM) :] if read[0] == 0 and line.startswith(_BOM) else line
                read[0] += len(line)
                yield text.decode("utf-8")

    with handle:
        handle.seek(offset)
        try:
            for number, cells in enumerate(csv.reader(lines()), number + 1):
                yield number, offset, [cell.strip() for cell in cells]
                offset = read[0]  # the reader takes a record's lines, and no more, before yielding it
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
    row = parse_row(cells, where, number, root, labels_required)
    return row._replace(header=check_image(row, cells[0], where, root, max_pixels))


def parse_row(cells: list[str], where: str, number: int, root: Path, labels_required: bool) -> Row:
    """One data row as a Row, its columns checked but not its image (`root` is resolved)."""
    label = cells[1] if len(cells) > 1 else ""
    if not cells[0] or "\0" in cells[0] or (labels_required and not label) or any(cells[2:]):
        raise CsvDatasetError(f"{where}: expected {_expected(labels_required)}, got {cells!r}")
    suffix = Path(cells[0]).suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise CsvDatasetError(
            f"{where}: image {cells[0]!r} is a {suffix} file, a format that is not read; "
            f"images must be {ACCEPTED_FORMATS}"
        )
    return Row(number, root / cells[0], label)


def check_image(row: Row, name: str, where: str, root: Path, max_pixels: int) -> ImageHeader:
    """The header of a row's image, read through one open file descriptor of its resolved path,
    confirmed to be a file under `root` (resolved) once open (open_image)."""
    try:
        with open_image(row.path, root) as handle:
            return check_image_file(handle, max_pixels)
    except ImageFileError as error:
        raise CsvDatasetError(
            f"{where}: image {name!r}{_unreadable(row.path, root) or f': {error}'}"
        ) from None


def _unreadable(path: Path, root: Path) -> str:
    """Why `path` cannot be an image under `root`, in the CSV's terms ("" when it could be)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        return f" cannot be resolved: {error}"
    if not resolved.is_relative_to(root):
        return (
            f" resolves to {str(resolved)!r}, outside the image root {root} (--image-root); "
            "image paths, symlinks included, must stay under it"
        )
    return "" if resolved.is_file() else f" not found under {root}"


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
