"""Listed photos decoded, converted and resized once, in parallel worker processes that write
straight into the prepared file; a file listed more than once is decoded once."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from tasks.data import prepared
from tasks.data.decoding import Preprocessing, load_image
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError
from tasks.data.photos import ImageFolderError, Listing

_CHUNK = 64  # images a worker decodes and writes per task
Place = tuple[str, int]  # a split and an index in it


def write_listing(
    path: Path,
    layout: prepared.Layout,
    listing: Listing,
    prep: Preprocessing,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_chunk: Optional[Callable[[int], None]] = None,
) -> None:
    """Decodes and preprocesses every listed image into the sized prepared file at `path`: `workers`
    processes, each writing its chunks in place, so no image crosses a process boundary and no
    decoding buffer stays in this process (one worker too: it is this process's twin, forked). A
    file listed again (same device, inode, size and modification time) is decoded once; its other
    places get a copy of the pixels written for it."""
    distinct, copies = _distinct(listing)
    tasks = [
        (path, layout, split, items[start : start + _CHUNK], Path(root), prep, max_pixels)
        for (split, items), root in zip(distinct.items(), listing.roots)
        for start in range(0, len(items), _CHUNK)
    ]
    # fork, as torch's DataLoader does on Linux: workers start in milliseconds with the modules
    # already imported (spawn would import torch and this project again, seconds per worker).
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=_one_thread) as pool:
        for count in pool.map(_write_chunk, tasks):
            on_chunk and on_chunk(count)
    if copies:
        prepared.copy_images(path, layout, copies)
        on_chunk and on_chunk(len(copies))


def _distinct(listing: Listing) -> tuple[dict[str, list[tuple[int, str]]], list[tuple[Place, Place]]]:
    """Per split, the (index, path) of each file's first listing; and (first, again) places of the
    files listed again."""
    first: dict[tuple[int, ...], Place] = {}
    distinct: dict[str, list[tuple[int, str]]] = {"train": [], "test": []}
    copies = []
    for split, (paths, _) in (("train", listing.train), ("test", listing.test)):
        for index, source in enumerate(paths):
            try:
                stat = os.stat(source)
                key: tuple[int, ...] = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            except OSError:  # decoding it names the problem
                key = (-1, len(first))
            if key in first:
                copies.append((first[key], (split, index)))
            else:
                first[key] = (split, index)
                distinct[split].append((index, source))
    return distinct, copies


def _one_thread() -> None:
    # One image at a time per process; the processes use the cores. Two threads per process would
    # also oversubscribe a busy machine, where small copies then wait milliseconds at each barrier.
    torch.set_num_threads(1)


def _write_chunk(task: tuple) -> int:
    path, layout, split, items, root, prep, max_pixels = task
    images = []
    for index, source in items:
        try:
            images.append((index, load_image(Path(source), prep, max_pixels, root)))
        except ImageFileError as error:
            raise ImageFolderError(f"{source}: {error}") from None
    start = 0
    while start < len(images):  # each run of consecutive indices in one write
        end = start + 1
        while end < len(images) and images[end][0] == images[end - 1][0] + 1:
            end += 1
        run = torch.stack([image for _, image in images[start:end]])
        prepared.write_images(path, layout, split, images[start][0], run)
        start = end
    return len(items)
