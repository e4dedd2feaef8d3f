"""The prepared-dataset file: both splits' uint8 images and int64 labels in one file that is
memory-mapped, never loaded, and written a slice at a time, so no step holds a split in RAM.

The layout is safetensors' (an 8-byte header length, a JSON table of arrays with their byte
offsets, then the bytes), so `safetensors` reads the file too; this module needs only NumPy.
Labels come first, then the images, each array contiguous, so a writer sizes the file once and
fills the images at known offsets from any process (`write_images`).

Every file `X` has a record `X.json` beside it: the file's size and the sha256 of its bytes. A
run checks them before it uses the file and rebuilds a file that fails. The record is written
before the file, and the bytes are a function of the data alone, so whichever writer's record a
reader sees matches whichever writer's file it sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from common.files import atomic_output
from tasks.data.images import ImageData

SUFFIX = ".safetensors"
_ORDER = ("train_labels", "test_labels", "train_images", "test_images")
_DTYPES = {"U8": np.uint8, "I64": np.int64}
_CHUNK = 16 << 20  # bytes hashed per read


@dataclass(frozen=True)
class Layout:
    """Where each array lies in a prepared file: name -> (dtype code, shape, absolute offset)."""

    arrays: dict[str, tuple[str, tuple[int, ...], int]]
    class_names: tuple[str, ...]
    header: bytes
    size: int  # bytes of the whole file

    def offset(self, name: str, index: int = 0) -> int:
        """File offset of item `index` (first axis) of array `name`."""
        code, shape, start = self.arrays[name]
        item = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(_DTYPES[code]).itemsize
        return start + index * item


def plan_layout(
    class_names: Sequence[str], train_count: int, test_count: int, image_shape: tuple[int, int, int]
) -> Layout:
    """The header and offsets of a file holding these splits (deterministic: same data, same bytes)."""
    shapes = {
        "train_labels": ("I64", (train_count,)),
        "test_labels": ("I64", (test_count,)),
        "train_images": ("U8", (train_count, *image_shape)),
        "test_images": ("U8", (test_count, *image_shape)),
    }
    table, begin = {}, 0
    for name in _ORDER:
        code, shape = shapes[name]
        end = begin + int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[code]).itemsize
        table[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    table["__metadata__"] = {"class_names": json.dumps(list(class_names))}
    text = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data start is aligned
    base = 8 + len(text)
    arrays = {
        name: (shapes[name][0], shapes[name][1], base + table[name]["data_offsets"][0]) for name in _ORDER
    }
    return Layout(arrays, tuple(class_names), struct.pack("<Q", len(text)) + text, base + begin)


def create_file(path: Path, layout: Layout, train_labels: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Writes the header and labels and sizes the file for the images (a sparse hole until filled)."""
    with open(path, "wb") as handle:
        handle.write(layout.header)
        for labels in (train_labels, test_labels):
            handle.write(labels.to(torch.int64).contiguous().numpy().tobytes())
        handle.truncate(layout.size)


def write_images(path: Path, layout: Layout, split: str, start: int, images: torch.Tensor) -> None:
    """Writes uint8 (N, C, H, W) `images` as items start.. of `split`'s images, in place."""
    data = images.contiguous().numpy().tobytes()
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, data, layout.offset(f"{split}_images", start))
    finally:
        os.close(descriptor)


def copy_images(path: Path, layout: Layout, pairs: Sequence[tuple[tuple[str, int], tuple[str, int]]]) -> None:
    """Copies prepared images within the file: for each ((split, index), (split, index)) pair, the
    first place's pixels to the second."""
    size = layout.offset("train_images", 1) - layout.offset("train_images")
    descriptor = os.open(path, os.O_RDWR)
    try:
        for (split, index), (to_split, to_index) in pairs:
            pixels = os.pread(descriptor, size, layout.offset(f"{split}_images", index))
            os.pwrite(descriptor, pixels, layout.offset(f"{to_split}_images", to_index))
    finally:
        os.close(descriptor)


def read_layout(path: Path) -> Layout:
    """The layout a prepared file's header declares."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        text = handle.read(length)
    table = json.loads(text)
    base = 8 + length
    arrays = {
        name: (entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0])
        for name, entry in table.items()
        if name != "__metadata__"
    }
    size = base + max(entry["data_offsets"][1] for name, entry in table.items() if name != "__metadata__")
    class_names = tuple(json.loads(table["__metadata__"]["class_names"]))
    return Layout(arrays, class_names, struct.pack("<Q", length) + text, size)


def open_file(path: str | Path) -> ImageData:
    """Maps a prepared file: pages are read from disk only when used, and never copied into this
    process's own memory (copy-on-write mapping that nothing writes)."""
    layout = read_layout(Path(path))
    arrays = {
        name: torch.from_numpy(np.memmap(path, dtype=_DTYPES[code], mode="c", offset=offset, shape=shape))
        for name, (code, shape, offset) in layout.arrays.items()
    }
    return ImageData(**arrays, class_names=layout.class_names)


def digests(path: Path, layout: Layout) -> tuple[str, str]:
    """sha256 of the file's bytes, and of the data (each array's shape and bytes in ImageData's
    order, then the class names: tasks.data.datasets.tensor_digest, streamed from the file)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            whole.update(chunk)
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            code, shape, offset = layout.arrays[name]
            data.update(str(shape).encode())
            handle.seek(offset)
            remaining = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[code]).itemsize
            while remaining:
                chunk = handle.read(min(_CHUNK, remaining))
                data.update(chunk)
                remaining -= len(chunk)
    data.update("\n".join(layout.class_names).encode())
    return whole.hexdigest(), data.hexdigest()


def publish(tmp: Path, path: Path, file_sha256: str) -> None:
    """Records `tmp`'s size and digest for `path`, then renames it there (record first: a reader
    that finds the file finds its record)."""
    with atomic_output(record_path(path)) as out:
        json.dump({"bytes": tmp.stat().st_size, "sha256": file_sha256}, out)
    os.replace(tmp, path)


def file_problem(path: Path, whole: bool = True) -> Optional[str]:
    """What is wrong with the prepared file at `path` by its record, or None if it matches; with
    `whole` False by its size alone, for a file that a run has hashed already (files are only ever
    replaced by rename, so the bytes it checked are the bytes at that name)."""
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
    if not whole:
        return None
    with open(path, "rb") as handle:
        if hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
            return "its sha256 differs from the recorded one"
    return None


def record_path(path: Path) -> Path:
    """Where the size and digest of the prepared file `path` are recorded."""
    return path.with_name(path.name + ".json")
