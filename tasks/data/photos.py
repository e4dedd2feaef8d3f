"""Your own photos: a class-folder tree or CSVs, listed and header-checked (tasks.data.photo_writer
then decodes, converts and resizes each once, straight into the prepared file)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.errors import UserError
from tasks.data.csv_images import encode_labels, label_set, read_rows
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, ImageHeader, check_image_file, open_image

FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # what the decoder reads


class ImageFolderError(UserError, ValueError):
    """A class-folder tree is missing, empty, or holds a file that is not a readable image."""


@dataclass(frozen=True)
class Listing:
    """The image files of both splits with their label indices, every header checked."""

    class_names: tuple[str, ...]
    train: tuple[tuple[str, ...], tuple[int, ...]]  # paths, labels
    test: tuple[tuple[str, ...], tuple[int, ...]]
    sizes: frozenset[tuple[int, int]]  # the (height, width) the headers declare
    colour: bool  # any image has colour
    train_origin: str
    test_origin: str
    stamp: str  # sha256 of what was listed: paths, labels, file sizes and modification times
    roots: tuple[str, str]  # the folders each split's files must stay under when decoded


def list_csv(
    train_csv: Path,
    test_csv: Path,
    image_root: Path,
    classes: Optional[list[str]] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Listing:
    """The notes' CustomImageDataset: two CSVs of (path under image_root, label), every row checked."""
    train_rows = read_rows(train_csv, image_root, max_pixels=max_pixels)
    test_rows = read_rows(test_csv, image_root, max_pixels=max_pixels)
    names = tuple(classes) if classes else label_set([row.label for row in train_rows])
    train_labels = encode_labels(train_rows, names, train_csv).tolist()
    test_labels = encode_labels(test_rows, names, test_csv).tolist()
    headers = [row.header for row in train_rows + test_rows]
    train = (tuple(str(row.path) for row in train_rows), tuple(train_labels))
    test = (tuple(str(row.path) for row in test_rows), tuple(test_labels))
    root = str(Path(image_root).resolve())
    return _listing(names, train, test, headers, str(train_csv), str(test_csv), (root, root))


def list_folder(
    train_dir: Path,
    test_dir: Optional[Path] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Listing:
    """torchvision's ImageFolder layout: one subfolder per class (sorted names are the classes). The
    test split is `test_dir` (same layout, same or fewer classes) or else a seeded, stratified
    `test_fraction` of each training class."""
    names = class_folders(train_dir)
    paths, labels, headers = folder_files(train_dir, names, max_pixels)
    if test_dir is not None:
        extra = sorted(set(class_folders(test_dir, minimum=1)) - set(names))
        if extra:
            raise ImageFolderError(f"{test_dir}: classes {extra} have no folder in {train_dir}")
        test_paths, test_labels, test_headers = folder_files(test_dir, names, max_pixels, missing_ok=True)
        train, test = (paths, labels), (test_paths, test_labels)
        roots = (str(train_dir.resolve()), str(test_dir.resolve()))
        return _listing(names, train, test, headers + test_headers, str(train_dir), str(test_dir), roots)
    keep, held = stratified_split(labels, test_fraction, seed)
    train = (tuple(paths[i] for i in keep), tuple(labels[i] for i in keep))
    test = (tuple(paths[i] for i in held), tuple(labels[i] for i in held))
    test_origin = f"{train_dir} (stratified test split: fraction {test_fraction}, seed {seed})"
    roots = (str(train_dir.resolve()),) * 2
    return _listing(names, train, test, headers, str(train_dir), test_origin, roots)


def class_folders(root: Path, minimum: int = 2) -> tuple[str, ...]:
    """The sorted names of `root`'s visible subfolders; at least `minimum` (a test folder may hold
    fewer classes than the training folder, but a training folder needs two). A subfolder that is a
    symlink leading outside `root` is refused."""
    if not root.is_dir():
        raise ImageFolderError(f"image folder {root} does not exist")
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in folders:
        inside(folder, root.resolve())
    names = tuple(sorted(folder.name for folder in folders))
    if len(names) < minimum:
        raise ImageFolderError(
            f"{root} has {len(names)} class folder(s) {list(names)}; expected one subfolder per class, "
            f"at least {minimum}"
        )
    return names


def folder_files(
    root: Path, classes: Sequence[str], max_pixels: int, missing_ok: bool = False
) -> tuple[tuple[str, ...], tuple[int, ...], list[ImageHeader]]:
    """Every image file under root/CLASS (any depth, sorted), with its label and checked header."""
    base = root.resolve()
    paths, labels, headers = [], [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir() and missing_ok:
            continue
        entries = list(folder.rglob("*"))  # symlinked subfolders are listed, not entered
        for entry in entries:
            if entry.is_symlink():
                inside(entry, base)
        files = sorted(p for p in entries if _listed(p, folder))
        if not files and not missing_ok:
            raise ImageFolderError(f"class folder {folder} holds no {'/'.join(FOLDER_SUFFIXES)} images")
        for path in files:
            headers.append(checked_header(path, base, max_pixels))
            paths.append(str(path))
            labels.append(label)
    if not paths:
        raise ImageFolderError(f"{root}: no images in its class folders {list(classes)}")
    return tuple(paths), tuple(labels), headers


def _listed(path: Path, folder: Path) -> bool:
    """An image file under `folder`, hidden by no part of its path (macOS's ._ files, .thumbs/)."""
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return not hidden and path.suffix.lower() in FOLDER_SUFFIXES and path.is_file()


def inside(path: Path, root: Path) -> Path:
    """`path` resolved, once it is known to stay under the resolved `root` (symlinks included)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise ImageFolderError(f"{path} cannot be resolved: {error}") from None
    if not resolved.is_relative_to(root):
        raise ImageFolderError(
            f"{path} resolves outside {root} (to {resolved}); images and class folders, symlinks "
            "included, must stay under the folder"
        )
    return resolved


def checked_header(path: Path, root: Path, max_pixels: int) -> ImageHeader:
    """The header of an image that stays under `root` (symlinks included), from the file opened."""
    resolved = inside(path, root)
    try:
        with open_image(resolved, root) as handle:
            return check_image_file(handle, max_pixels)
    except ImageFileError as error:
        raise ImageFolderError(f"{path}: {error}") from None


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test): `fraction` of each class, rounded, drawn by `seed`; a class of two or
    more images keeps at least one on each side."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    by_class = torch.as_tensor(labels)
    for label in sorted(set(labels)):
        members = torch.nonzero(by_class == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        count = min(max(1, round(len(members) * fraction)), len(members) - 1) if len(members) > 1 else 0
        test += members[:count]
        train += members[count:]
    if not test:
        raise ImageFolderError(f"a test fraction of {fraction} leaves no test images; give --test-dir")
    return sorted(train), sorted(test)


def _listing(names, train, test, headers, train_origin: str, test_origin: str, roots) -> Listing:
    digest = hashlib.sha256("\n".join(names).encode())
    for split, (paths, labels) in (("train", train), ("test", test)):
        for path, label in zip(paths, labels):
            stat = os.stat(path)
            digest.update(f"{split}\t{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return Listing(
        class_names=tuple(names),
        train=train,
        test=test,
        sizes=frozenset((header.height, header.width) for header in headers),
        colour=any(header.colour for header in headers),
        train_origin=train_origin,
        test_origin=test_origin,
        stamp=digest.hexdigest(),
        roots=roots,
    )
