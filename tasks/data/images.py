"""The in-memory form every dataset source produces, and the header check every image file passes
before it is decoded."""

from __future__ import annotations

import functools
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional, Union

import torch

from tasks.data.image_headers import ImageFileError, ImageHeader, read_header

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# ImageFileError and ImageHeader live with the header readers and are used from here too.
__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageData",
    "ImageFileError",
    "ImageHeader",
    "check_image_data",
    "check_image_file",
    "open_image",
    "read_image_header",
]


class ImageData(NamedTuple):
    """uint8 images (N, C, H, W) with int64 labels, for both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]


def check_image_data(data: ImageData) -> ImageData:
    """Raises ValueError when shapes, dtypes or labels are inconsistent."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{split} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{split} split has {len(images)} images and {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= len(data.class_names):
            raise ValueError(f"{split} labels must lie in [0, {len(data.class_names)})")
    train_shape, test_shape = tuple(data.train_images.shape[1:]), tuple(data.test_images.shape[1:])
    if train_shape != test_shape:
        raise ValueError(f"train images are {train_shape}, test images {test_shape}")
    return data


DEFAULT_MAX_PIXELS = 50_000_000  # flows.config's max_image_pixels default: ~7000 x 7000
# O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused once open, as not a regular file.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
Source = Union[str, os.PathLike, BinaryIO]


def open_image(path: Path, root: Optional[Path] = None) -> BinaryIO:
    """The file `path` resolves to, opened read-only at position 0: with a `root`, only when it
    resolves under root (symlinks included) and is still there once open, so a path component
    swapped for a symlink in between cannot escape; never a FIFO, device or folder."""
    # Plain strings and os calls: this runs twice per image (listing, decoding), and pathlib's
    # resolve and is_relative_to cost several times the open itself.
    base = _resolved_root(os.fspath(root)) if root is not None else None
    resolved = os.path.realpath(path)  # a loop or a missing file fails to open, below
    if base is not None and not _under(resolved, base):
        raise ImageFileError(f"{path} resolves to {resolved}, outside {base}; images must stay under it")
    try:
        handle = open(resolved, "rb", opener=lambda name, _: os.open(name, _OPEN_FLAGS))
    except OSError as error:  # ELOOP: the last component became a symlink after it was resolved
        raise ImageFileError(
            f"cannot read {path} (resolved to {resolved}): {error.strerror or error}"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ImageFileError(f"{path} (resolved to {resolved}) is not a regular file")
        opened = _opened_path(handle.fileno())
        if base is not None and opened is not None and not _under(opened, base):
            raise ImageFileError(
                f"{path} was opened at {opened}, outside {base}: moved after it was resolved"
            )
    except BaseException:
        handle.close()
        raise
    return handle


@functools.lru_cache(maxsize=64)
def _resolved_root(root: str) -> str:
    return os.path.realpath(root)


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


_PROC_FD = sys.platform == "linux" and os.path.isdir("/proc/self/fd")


def _opened_path(descriptor: int) -> Optional[str]:
    """Where an open file actually is (Linux's /proc, macOS's F_GETPATH), or None where unknown."""
    if _PROC_FD:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    if hasattr(fcntl, "F_GETPATH"):
        return fcntl.fcntl(descriptor, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0").decode()
    return None


def check_image_file(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Reads the header of an image file (a path, or an open binary file, read from its start and
    left there), without decoding it: refuses files that are not PNG, JPEG, GIF or WebP, and images
    declaring more than `max_pixels` pixels (decompression bombs)."""
    header = read_image_header(source)
    pixels = header.width * header.height
    if pixels == 0:
        raise ImageFileError(f"its {header.format} header declares {header.width}x{header.height} pixels")
    if pixels > max_pixels:
        raise ImageFileError(
            f"its {header.format} header declares {header.width}x{header.height} = {pixels:,} pixels, "
            f"over the limit of {max_pixels:,} (--max-image-pixels); it was not decoded"
        )
    return header


def read_image_header(source: Source) -> ImageHeader:
    """Format, width and height as decoding the first frame allocates them, from the headers of a
    path or of an open binary file (left at position 0); see tasks.data.image_headers."""
    if isinstance(source, (str, os.PathLike)):
        with open_image(Path(source)) as handle:
            return read_image_header(handle)
    try:
        return read_header(source)
    except OSError as error:
        raise ImageFileError(f"cannot read it: {error.strerror or error}") from None
    finally:
        source.seek(0)
