"""Atomic file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import torch


def _part_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves the old file or none, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: Path) -> Iterator[IO[str]]:
    """A text file written in steps that appears at `path` only when the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_path(path)
    try:
        with open(tmp, "w", newline="") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
