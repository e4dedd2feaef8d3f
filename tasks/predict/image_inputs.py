"""What to predict: a CSV, a folder or a dataset's test split, described without its pixels and
cut into partitions that decode themselves a batch at a time."""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch

from common.errors import UserError
from tasks.data.csv_images import ACCEPTED_FORMATS, IMAGE_SUFFIXES, CsvDatasetError, Row, iter_rows
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.decoding import Preprocessing, load_image
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, ImageHeader, check_image_file, open_image
from tasks.data.sources import MemorySource

# csv: rows between the row offsets a listing records when not given the partition size: a part then
# parses (without checking) fewer than this many rows before its own, and a million-row CSV's listing
# holds a thousand marks.
MARK_EVERY = 1000


class PredictionError(UserError, ValueError):
    """The model, alias or images asked for cannot be used."""


Size = tuple[int, int]  # (height, width)
Batch = tuple[list[str], list[Optional[str]], list[torch.Tensor]]  # sources, labels, uint8 images
Mark = tuple[int, int, int]  # csv: an image's index, where its row starts (bytes), rows before it
_LAST = 1 << 62  # sorts after any offset: (i, _LAST) follows every mark of image i


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
    # csv: rows reading may start from, in order; a part keeps the last at or before its start and those
    # inside it, so the rows before it are not read and what it carries grows with its size only
    marks: tuple[Mark, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()  # folder: (suffix, count) of the files that are not images

    def __len__(self) -> int:
        return self.stop - self.start

    def part(self, begin: int, end: int) -> "Inputs":
        """Images begin..end of these (clipped, like a slice)."""
        begin, end = min(begin, len(self)), min(end, len(self))
        start, stop = self.start + begin, self.start + end
        first = max(0, bisect.bisect_right(self.marks, (start, _LAST)) - 1)  # the last at or before start
        marks = self.marks[first : max(first + 1, bisect.bisect_left(self.marks, (stop, 0)))]
        return replace(self, start=start, stop=stop, names=self.names[begin:end], marks=marks)

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
        root = Path(self.image_root if self.kind == "csv" else self.origin).resolve()
        rows = self._csv_rows() if self.kind == "csv" else self._folder_rows()
        while chunk := list(itertools.islice(rows, size)):
            images = [self._load(row, prep, root) for row in chunk]
            yield [str(row.path) for row in chunk], [row.label or None for row in chunk], images

    def _csv_rows(self) -> Iterator[Row]:
        """Rows start..stop, read from the last mark before them: the CSV before it is not read, and
        the images are checked as they are decoded, not here."""
        first = bisect.bisect_right(self.marks, (self.start, _LAST)) - 1
        mark = self.marks[first] if first >= 0 else None
        index, start = (mark[0], mark[1:]) if mark else (0, None)  # None: from the top, header and all
        rows = iter_rows(Path(self.origin), Path(self.image_root), False, start=start, check_files=False)
        return itertools.islice(rows, self.start - index, self.stop - index)

    def _folder_rows(self) -> Iterator[Row]:
        folder = Path(self.origin)
        return (Row(self.start + i + 1, folder / name, "") for i, name in enumerate(self.names))

    def _load(self, row: Row, prep: Preprocessing, root: Path) -> torch.Tensor:
        """The image checked (under `root`, header) and decoded through one open file."""
        try:
            return load_image(row.path, prep, self.max_pixels, root=root)
        except ImageFileError as error:
            raise CsvDatasetError(f"{self.origin} row {row.line}: {row.path}: {error}") from None


def csv_inputs(
    csv_path: Path,
    image_root: Path,
    class_names: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: Optional[Size] = None,
    mark_every: int = MARK_EVERY,
) -> Inputs:
    """Images named by a CSV (labels optional): every row and image header is checked (against
    `size` too, when given), none is kept in memory. Where every `mark_every`-th row starts is
    recorded, so that parts starting there (all of them, with partitions of that size) read from
    their own first row."""
    count, labels, marks = 0, set(), []
    for row in iter_rows(csv_path, image_root, False, max_pixels):
        check_size(row.header, str(row.path), size)
        if count % mark_every == 0:
            marks.append((count, row.offset, row.line - 1))
        count += 1
        labels.add(row.label or None)
    if not count:
        raise PredictionError(
            f"{csv_path}: no image rows (empty, or only a header); expected 'image path[,label]' rows"
        )
    check_labels(labels, class_names)
    return Inputs(
        "csv", str(csv_path), 0, count, image_root=str(image_root), max_pixels=max_pixels, marks=tuple(marks)
    )


def folder_inputs(folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS, size: Optional[Size] = None) -> Inputs:
    """Every image file directly in `folder`, in name order, each checked from its header (against
    `size` too, when given) through one open file confirmed to be in the folder; files of other
    suffixes are skipped (`skipped`, see `skipped_note`), symlinks that leave the folder refused."""
    if not folder.is_dir():
        raise PredictionError(f"image folder {folder} does not exist")
    root, skipped, outside, files = folder.resolve(), Counter(), [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped[path.suffix.lower() or "(no suffix)"] += 1
        elif not path.resolve().is_relative_to(root):
            outside.append(f"{path.name} -> {path.resolve()}")
        else:
            files.append(path)
    if outside:
        raise PredictionError(
            f"{folder}: symlinks resolving outside the folder: {_some(outside)}; images must stay in it"
        )
    if not files:
        raise PredictionError(f"no images ({ACCEPTED_FORMATS}) in {folder}")
    for path in files:
        check_size(_folder_header(path, root, max_pixels), str(path), size)
    names = tuple(path.name for path in files)
    return Inputs(
        "folder",
        str(folder),
        0,
        len(names),
        names=names,
        max_pixels=max_pixels,
        skipped=tuple(skipped.items()),
    )


def _folder_header(path: Path, root: Path, max_pixels: int) -> ImageHeader:
    try:
        with open_image(path, root) as handle:
            return check_image_file(handle, max_pixels)
    except ImageFileError as error:
        raise PredictionError(f"{path}: {error}") from None


def _some(names: list[str], shown: int = 5) -> str:
    """Up to `shown` names, quoted, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(name) for name in names[:shown]) + more


def skipped_note(inputs: Inputs) -> str:
    """What a folder listing left out, for the user ("" when nothing)."""
    if not inputs.skipped:
        return ""
    count = sum(n for _, n in inputs.skipped)
    kinds = ", ".join(f"{suffix} ({n})" for suffix, n in sorted(inputs.skipped))
    return (
        f"{inputs.origin}: skipped {count} file(s) that are not images by their suffix: {kinds}; "
        f"images must be {ACCEPTED_FORMATS}"
    )


def dataset_inputs(source: MemorySource, data_dir: Path, class_names: Sequence[str]) -> Inputs:
    """The test split of a dataset, labelled, prepared in `data_dir` as training prepares it."""
    dataset = prepare_dataset(source, data_dir)
    check_labels(set(dataset.class_names), class_names)
    return Inputs(
        "dataset",
        dataset.prepared_path,
        0,
        dataset.test_size,
        dataset=source.name,
        class_names=dataset.class_names,
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
    """Consecutive parts of at most `size` images, in input order; a CSV's part starts reading at the
    last mark at or before its first row (that row itself when `size` is a multiple of the listing's
    `mark_every`), so it reads none of the CSV before that mark."""
    return [inputs.part(start, start + size) for start in range(0, len(inputs), size)]
