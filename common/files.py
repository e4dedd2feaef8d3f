"""Atomic file writes: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator, Optional

import torch

from common.errors import UserError


class OutputWriteError(UserError, OSError):
    """A file could not be written (disk full, permissions...); whatever was at its path before is
    untouched. `filename` is the file that could not be written, `filename2` what was copied to it."""

    def __str__(self) -> str:
        reason = f"[Errno {self.errno}] {self.strerror}" if self.errno else self.strerror
        if self.filename2:
            return f"cannot copy {self.filename2} to {self.filename}: {reason}"
        return f"cannot write {self.filename}: {reason}"


def write_error(path: Path | str, error: OSError, source: Optional[Path | str] = None) -> OutputWriteError:
    """`error`, raised while writing `path` (copied from `source`), as an OutputWriteError naming them."""
    strerror = error.strerror or str(error)
    return OutputWriteError(error.errno, strerror, str(path), None, source and str(source))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name; when the block completes
    the file is synced to disk and renamed to `path`. On failure the temporary file is removed,
    `path` keeps its old content, and an OSError becomes an OutputWriteError naming `path`."""
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor, tmp = exclusive_temp(path)
        except OSError as error:  # it names the temporary file; the error is about `path`
            raise write_error(path, error) from error
        os.close(descriptor)  # the writer opens it by name; the name is ours alone
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OutputWriteError:
        raise
    except OSError as error:
        if _names_another_file(error, (path, *path.parents, *([tmp] if tmp else []))):
            raise  # an input the block reads failed, not this write
        raise write_error(path, error) from error
    finally:
        if tmp is not None:
            with suppress(OSError):  # a failure here would hide the one that matters
                tmp.unlink(missing_ok=True)


def exclusive_temp(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path` under a random name, open for writing: created with O_EXCL, so
    never a file or link someone placed there, with the umask's permissions (unlike mkstemp's 0600,
    which would hide a shared data folder's files from its other users)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**-64 for a random name; a planted one is simply passed over
            continue


def _names_another_file(error: OSError, ours: tuple[Path, ...]) -> bool:
    return isinstance(error.filename, (str, os.PathLike)) and Path(error.filename) not in ours


def _fsync(path: Path) -> None:
    # Without it a power cut after the rename can leave an empty file under the final name.
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves the old file or none, never half."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as error:
            # torch's C++ writer turns the file's OSError (a full disk) into a vague RuntimeError.
            if isinstance(error.__context__, OSError):
                raise write_error(path, error.__context__) from error
            raise


@contextmanager
def atomic_output(path: Path) -> Iterator[IO[str]]:
    """A text file written in steps that appears at `path` only when the block completes."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        yield handle


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive OS lock on `path` (created if missing) for the block: one process at a
    time on this machine, and the OS releases it when a holder dies."""
    import fcntl  # POSIX

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
