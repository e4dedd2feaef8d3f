"""The prepared dataset where a sweep's trial runs: the flow's own file when this machine sees it at
the same path (the flow's machine, or a folder the workers share), else this machine's own copy,
prepared once from the same source into its own data folder and named by the dataset digest.

A worker on another machine needs no shared folder: it prepares what the flow prepared, checks
that it got the same data (the digest), and every later trial there finds the copy by that digest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import struct
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Optional

from common.files import file_lock
from tasks.data import prepared
from tasks.data.datasets import DatasetRef, prepare_dataset
from tasks.data.sources import DataSource, PhotoSource, Shape
from tasks.data.steps import usable_cores
from tasks.data.storing import Logger

_logger = logging.getLogger(__name__)


class DatasetMismatchError(ValueError):
    """A worker prepared the dataset from its own source and got other data than the flow did."""


class CannotPrepareHereError(RuntimeError):
    """This process cannot prepare the dataset, and does not see the flow's prepared file."""


@dataclass(frozen=True)
class DataRecipe:
    """How any machine prepares a sweep's dataset: the source and data folder as the user gave them,
    so that a relative folder or file resolves in the working directory of the process that
    prepares it (a source makes its paths absolute only when it reads them)."""

    source: DataSource
    data_dir: str
    shape: Shape = Shape()
    workers: Optional[int] = None  # processes decoding photos; default: one per core


def _here(path: PurePath) -> Path:
    return Path(path).expanduser().resolve()


def copy_problem(path: Path, dataset: DatasetRef) -> Optional[str]:
    """What keeps the file at `path` from being `dataset`'s prepared data, or None if nothing does.

    Cheap: its record's size and its header's shapes and classes, not its bytes. Prepared files are
    named by their data's digest and only ever replaced by rename, so a complete file under the
    digest's name holds that data; the run that wrote it hashed it whole."""
    if not path.is_file():
        return "no such file on this machine"
    problem = prepared.file_problem(path, whole=False)
    if problem is not None:
        return problem
    try:
        layout = prepared.read_layout(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        return f"unreadable header ({error})"
    image = (dataset.channels, *dataset.image_size)
    expected = {"train_images": (dataset.train_size, *image), "test_images": (dataset.test_size, *image)}
    shapes = {name: layout.arrays[name][1] for name in expected if name in layout.arrays}
    if shapes != expected or layout.class_names != dataset.class_names:
        found, wanted = list(layout.class_names), list(dataset.class_names)
        return f"it holds {shapes} of classes {found}, not {expected} of {wanted}"
    return None


def local_path(dataset: DatasetRef, data_dir: Path) -> Path:
    """Where this machine's copy of `dataset` lies in `data_dir`: the name its digest gives it."""
    return data_dir / "prepared" / f"{dataset.name}-{dataset.sha256[:16]}{prepared.SUFFIX}"


def dataset_here(dataset: DatasetRef, recipe: DataRecipe, logger: Optional[Logger] = None) -> DatasetRef:
    """`dataset` as this process can read it: at its own path when that holds it, else this
    machine's copy in `recipe.data_dir`, prepared now if no trial here has prepared it yet (one
    preparation per machine: trials at once wait for it). Raises DatasetMismatchError when this
    machine's source gives other data."""
    if copy_problem(Path(dataset.prepared_path), dataset) is None:
        return dataset
    data_dir = _here(PurePath(recipe.data_dir))
    local = local_path(dataset, data_dir)
    if copy_problem(local, dataset) is None:
        return replace(dataset, prepared_path=str(local))
    # Preparing twice at once would be safe (unique temporary files, published by rename), but
    # it costs the whole preparation again; the lock makes the others wait and then reuse it.
    with file_lock(local.parent / f".{local.stem}.lock"):
        if copy_problem(local, dataset) is None:
            return replace(dataset, prepared_path=str(local))
        check_can_decode_photos(dataset, recipe.source)
        (logger or _logger).info(
            "%s is not on this machine; preparing %s into %s", dataset.prepared_path, dataset.name, data_dir
        )
        workers = recipe.workers or usable_cores()
        made = prepare_dataset(recipe.source, data_dir, logger, recipe.shape, workers)
    if made.sha256 != dataset.sha256:
        raise DatasetMismatchError(
            f"worker {socket.gethostname()}:{os.getpid()} prepared {dataset.name} into {made.prepared_path} "
            f"with sha256 {made.sha256}, but the sweep's data has sha256 {dataset.sha256} (prepared by "
            f"the flow as {dataset.prepared_path}): this machine's source differs (another file, folder "
            "or download). Give every worker the same source, or a --data-dir they all share."
        )
    return replace(dataset, prepared_path=made.prepared_path)


def check_can_decode_photos(dataset: DatasetRef, source: DataSource) -> None:
    """Raises CannotPrepareHereError for photos in a daemonic process (a Dask worker under its
    nanny), which may not start the processes that decode them."""
    if isinstance(source, PhotoSource) and multiprocessing.current_process().daemon:
        raise CannotPrepareHereError(
            f"worker {socket.gethostname()}:{os.getpid()} does not see {dataset.prepared_path} and must "
            f"prepare the {dataset.name} photos itself, but it runs as a daemonic process (a Dask worker "
            "under its nanny), which may not start the processes that decode them: start the Dask "
            "workers with DASK_DISTRIBUTED__WORKER__DAEMON=False, or give them a --data-dir they share "
            "with the flow"
        )
