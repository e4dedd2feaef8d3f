"""FashionMNIST and MNIST through torchvision: files under the data dir, else a checked download."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from torchvision import datasets

from common import downloads
from common.downloads import DownloadLimitError
from common.errors import UserError
from common.files import exclusive_temp
from common.redaction import redact_url as redact
from tasks.data.images import ImageData

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
OFFLINE_HINT = (
    "Offline choices: put the files under --data-dir yourself ({folder}), "
    "or use --dataset folder, --dataset csv, --dataset synthetic or --dataset digits."
)
MAX_FILE_BYTES = 64 << 20  # the largest file (train images) is about 26 MB
DEADLINE_SECONDS = 600.0  # per file: 26 MB at 45 kB/s
_TIMEOUT_SECONDS = 10
_ATTEMPTS = 4
_BACKOFF_SECONDS = 0.5


class DownloadError(UserError, RuntimeError):
    """The dataset could not be fetched; the message says what to do instead."""


class ChecksumError(UserError, RuntimeError):
    """A downloaded file does not match its published checksum."""


def load_mnist_family(dataset: str, data_dir: Path, mirror: Optional[str] = None) -> ImageData:
    """Loads torchvision's `dataset` (FashionMNIST or MNIST) from `data_dir`, downloading and
    verifying any missing raw file first."""
    source = torchvision_source(dataset)
    raw_folder = data_dir / dataset / "raw"  # where torchvision looks
    mirrors = [mirror.rstrip("/") + "/"] if mirror else source.mirrors
    for archive, md5 in source.resources:
        _ensure_raw_file(raw_folder, archive, md5, mirrors)
    splits = [source(root=str(data_dir), train=train, download=False) for train in (True, False)]
    return ImageData(
        splits[0].data.unsqueeze(1).contiguous(),
        splits[0].targets.long(),
        splits[1].data.unsqueeze(1).contiguous(),
        splits[1].targets.long(),
        tuple(source.classes),
    )


def raw_files_stamp(dataset: str, data_dir: Path) -> Optional[list[tuple[str, int, int]]]:
    """(file, size, mtime in ns) of torchvision's `dataset`'s extracted files, or None while any is
    missing: what a prepared copy of them must have been made from."""
    files = [data_dir / dataset / "raw" / file for file in RAW_FILES]
    if not all(file.exists() for file in files):
        return None
    return [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]


def torchvision_source(dataset: str) -> type:
    """torchvision's dataset class `dataset` (FashionMNIST or MNIST)."""
    return {"FashionMNIST": datasets.FashionMNIST, "MNIST": datasets.MNIST}[dataset]


def _ensure_raw_file(raw_folder: Path, archive: str, md5: str, mirrors: list[str]) -> None:
    """Makes sure the extracted form of `archive` exists in `raw_folder`."""
    extracted = raw_folder / archive.removesuffix(".gz")
    if extracted.exists():
        return
    packed = raw_folder / archive
    if not packed.exists():
        download_file([mirror + archive for mirror in mirrors], packed, md5)
    descriptor, tmp = exclusive_temp(extracted)
    try:
        with os.fdopen(descriptor, "wb") as dst, gzip.open(packed, "rb") as src:
            shutil.copyfileobj(src, dst)
        tmp.replace(extracted)
    finally:
        tmp.unlink(missing_ok=True)


def download_file(
    urls: list[str],
    target: Path,
    md5: str,
    max_bytes: int = MAX_FILE_BYTES,
    deadline_seconds: float = DEADLINE_SECONDS,
) -> None:
    """Downloads the first reachable URL to `target` atomically; the md5 must match.

    Transient failures (timeouts, resets, HTTP 5xx/429) are retried with jittered exponential
    backoff; an unresolvable host, an HTTP 4xx or a file over `max_bytes` or `deadline_seconds`
    moves on to the next URL at once, so offline runs fail fast.
    """
    errors = []
    for url in urls:
        try:
            _fetch_with_backoff(url, target, md5, max_bytes, deadline_seconds)
            return
        except DownloadLimitError as error:
            errors.append(str(error))  # it names the URL
        except (urllib.error.URLError, OSError) as error:
            errors.append(f"{redact(url)}: {error}")
    hint = OFFLINE_HINT.format(folder=target.parent)
    raise DownloadError(f"could not download {target.name}: {'; '.join(errors)}. {hint}")


def _fetch_with_backoff(url: str, target: Path, md5: str, max_bytes: int, deadline: float) -> None:
    """Downloads `url` to `target`, retrying transient errors; a wrong md5 keeps nothing."""

    def verify(digest: str) -> None:
        if digest != md5:
            raise ChecksumError(f"{redact(url)} has md5 {digest}, expected {md5}; nothing was kept")

    for attempt in range(1, _ATTEMPTS + 1):
        try:
            downloads.download(url, target, max_bytes, deadline, "md5", verify, _TIMEOUT_SECONDS)
            return
        except (urllib.error.URLError, OSError) as error:
            if attempt == _ATTEMPTS or not _is_transient(error):
                raise
            time.sleep(_BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


def _is_transient(error: OSError) -> bool:
    """Worth retrying: server overload or a dropped connection, not a bad URL, no network, or a
    file too big or too slow (it would be again)."""
    if isinstance(error, DownloadLimitError):
        return False
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    reason = getattr(error, "reason", error)
    return not isinstance(reason, (socket.gaierror, ConnectionRefusedError))
