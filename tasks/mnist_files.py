"""FashionMNIST and MNIST through torchvision: files under the data dir, else a checked download."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from torchvision import datasets

from tasks.images import ImageData

SOURCES: dict[str, type[datasets.MNIST]] = {
    "fashion-mnist": datasets.FashionMNIST,
    "mnist": datasets.MNIST,
}
OFFLINE_HINT = (
    "Offline choices: put the files under --data-dir yourself ({folder}), "
    "or use --dataset csv, --dataset synthetic or --dataset digits."
)
_TIMEOUT_SECONDS = 10


class DownloadError(RuntimeError):
    """The dataset could not be fetched; the message says what to do instead."""


class ChecksumError(RuntimeError):
    """A downloaded file does not match its published checksum."""


def load_mnist_family(name: str, data_dir: Path, mirror: Optional[str] = None) -> ImageData:
    """Loads `name` from `data_dir`, downloading and verifying any missing raw file first."""
    source = SOURCES[name]
    raw_folder = data_dir / source.__name__ / "raw"
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


def _ensure_raw_file(raw_folder: Path, archive: str, md5: str, mirrors: list[str]) -> None:
    """Makes sure the extracted form of `archive` exists in `raw_folder`."""
    extracted = raw_folder / archive.removesuffix(".gz")
    if extracted.exists():
        return
    packed = raw_folder / archive
    if not packed.exists():
        download_file([mirror + archive for mirror in mirrors], packed, md5)
    tmp = extracted.with_name(extracted.name + ".part")
    with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(extracted)


def download_file(urls: list[str], target: Path, md5: str) -> None:
    """Downloads the first reachable URL to `target` atomically; the md5 must match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    errors = []
    for url in urls:
        try:
            digest = hashlib.md5()
            with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: {error}")
            continue
        if digest.hexdigest() != md5:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(f"{url} has md5 {digest.hexdigest()}, expected {md5}; nothing was kept")
        tmp.replace(target)
        return
    hint = OFFLINE_HINT.format(folder=target.parent)
    raise DownloadError(f"could not download {target.name}: {'; '.join(errors)}. {hint}")
