"""Photos listed from class folders, split, fingerprinted, and decoded in parallel into the prepared file."""

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from photos import write_class_folders, write_grey_png, write_kind

from tasks.data import photo_writer, prepared
from tasks.data.datasets import DatasetRef, load_tensors, prepare_dataset
from tasks.data.decoding import Preprocessing, load_image
from tasks.data.photos import ImageFolderError, list_folder, stratified_split
from tasks.data.sources import FolderSource, Shape


def noise(size: tuple[int, int] = (6, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def write_tree(root: Path, files: dict[str, str], size: tuple[int, int] = (6, 8)) -> None:
    """root/RELATIVE for each RELATIVE: KIND (a kind of tests/photos.py, whose suffix RELATIVE has)."""
    for index, (relative, kind) in enumerate(files.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        written = write_kind(kind, path.with_suffix(""), noise(size, index))
        written.rename(path)  # keeps RELATIVE's own suffix, such as an upper-case one


# Listing a class-folder tree


def test_classes_are_the_sorted_visible_subfolders_and_files_are_found_at_any_depth(tmp_path):
    write_tree(
        tmp_path / "train",
        {
            "b_cat/E.JPG": "rgb_jpeg",
            "b_cat/a.png": "grey_png",
            "b_cat/b/c/deep.webp": "lossless_webp",
            "b_cat/d.gif": "palette_gif",
            "a_dog/x.png": "rgb_png",
            "a_dog/y.jpeg": "grey_jpeg",
            "c_eel/z.png": "rgb_png",
            ".hidden/h.png": "rgb_png",  # not a class
            "stray.png": "rgb_png",  # not in a class folder
        },
    )
    (tmp_path / "train" / "a_dog" / "notes.txt").write_text("not an image")
    write_kind("rgb_png", tmp_path / "train" / "a_dog" / "image", noise()).rename(
        tmp_path / "train" / "a_dog" / "image.bmp"  # a suffix the decoder is not asked to read
    )
    (tmp_path / "train" / "a_dog" / "folder.png").mkdir()  # a folder, whatever its name
    write_tree(tmp_path / "test", {"c_eel/t.png": "rgb_png", "b_cat/t.png": "rgb_png"})
    listing = list_folder(tmp_path / "train", tmp_path / "test")
    assert listing.class_names == ("a_dog", "b_cat", "c_eel")
    root, test = tmp_path / "train", tmp_path / "test"
    names = [
        "a_dog/x.png",
        "a_dog/y.jpeg",
        "b_cat/E.JPG",
        "b_cat/a.png",
        "b_cat/b/c/deep.webp",
        "b_cat/d.gif",
        "c_eel/z.png",
    ]
    assert listing.train == (tuple(str(root / name) for name in names), (0, 0, 1, 1, 1, 1, 2))
    assert listing.test == (
        (str(test / "b_cat" / "t.png"), str(test / "c_eel" / "t.png")),
        (1, 2),
    )  # no a_dog
    assert (listing.train_origin, listing.test_origin) == (str(root), str(test))


def test_a_test_folder_may_not_add_classes(tmp_path):
    write_tree(tmp_path / "train", {"a/1.png": "rgb_png", "b/1.png": "rgb_png"})
    write_tree(tmp_path / "test", {"a/1.png": "rgb_png", "ghost/1.png": "rgb_png", "zombie/1.png": "rgb_png"})
    message = f"{tmp_path / 'test'}: classes ['ghost', 'zombie'] have no folder in {tmp_path / 'train'}"
    with pytest.raises(ImageFolderError, match=re.escape(message)):
        list_folder(tmp_path / "train", tmp_path / "test")


def test_trees_that_are_not_class_folders_are_refused(tmp_path):
    with pytest.raises(ImageFolderError, match=r"image folder .*absent does not exist"):
        list_folder(tmp_path / "absent")
    write_tree(tmp_path / "one", {"only/1.png": "rgb_png", ".git/1.png": "rgb_png"})
    with pytest.raises(ImageFolderError, match=r"has 1 class folder\(s\) \['only'\]; .* at least 2"):
        list_folder(tmp_path / "one")
    write_tree(tmp_path / "empty", {"a/1.png": "rgb_png", "b/sub/1.bmp": "rgb_png"})
    empty = re.escape(f"class folder {tmp_path / 'empty' / 'b'} holds no .png/.jpg/.jpeg/.gif/.webp images")
    with pytest.raises(ImageFolderError, match=empty):
        list_folder(tmp_path / "empty")
    write_tree(tmp_path / "ok", {"a/1.png": "rgb_png", "b/1.png": "rgb_png"})
    write_tree(tmp_path / "test", {"a/sub/x.txt": "rgb_png", "b/x.bmp": "rgb_png"})  # no images
    with pytest.raises(ImageFolderError, match=r"test: no images in its class folders \['a', 'b'\]"):
        list_folder(tmp_path / "ok", tmp_path / "test")


def test_files_are_header_checked_and_named(tmp_path):
    write_tree(tmp_path / "train", {"a/1.png": "rgb_png", "b/1.png": "rgb_png", "b/2.png": "rgb_png"})
    fake = tmp_path / "train" / "b" / "2.png"
    fake.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ImageFolderError, match=re.escape(f"{fake}: it is not a PNG, JPEG, GIF or WebP")):
        list_folder(tmp_path / "train")
    fake.unlink()
    root = tmp_path / "train"
    with pytest.raises(
        ImageFolderError, match=r"1.png: its PNG header declares 8x6 = 48 pixels, over the limit of 47"
    ):
        list_folder(root, root, max_pixels=47)  # one image a class: the folder is its own test split
    assert list_folder(root, root, max_pixels=48).sizes == {(6, 8)}


def test_symlinks_leaving_the_folder_are_refused(tmp_path):
    write_tree(tmp_path / "train", {"a/1.png": "rgb_png", "b/1.png": "rgb_png", "b/2.png": "rgb_png"})
    write_tree(tmp_path / "outside", {"c/secret.png": "rgb_png"})
    root = tmp_path / "train"
    (root / "a" / "inside.png").symlink_to(root / "b" / "1.png")  # staying inside is fine
    assert len(list_folder(root, test_fraction=0.5).train[0]) == 2
    (root / "a" / "link.png").symlink_to(tmp_path / "outside" / "c" / "secret.png")
    outside = re.escape(f"{root / 'a' / 'link.png'} resolves outside {root.resolve()}")
    with pytest.raises(ImageFolderError, match=outside):
        list_folder(root)
    (root / "a" / "link.png").unlink()
    (root / "c").symlink_to(tmp_path / "outside" / "c")  # a whole class folder outside
    refused = f"{root / 'c'} resolves outside {root.resolve()} (to {tmp_path / 'outside' / 'c'})"
    with pytest.raises(ImageFolderError, match=re.escape(refused)):
        list_folder(root)
    (root / "c").unlink()
    (tmp_path / "empty").mkdir()
    (root / "c").symlink_to(tmp_path / "empty")  # outside, even with nothing in it
    with pytest.raises(ImageFolderError, match=re.escape(f"{root / 'c'} resolves outside")):
        list_folder(root)
    (root / "c").unlink()
    (root / "a" / "deeper").symlink_to(tmp_path / "outside")  # a subfolder of a class, outside
    with pytest.raises(ImageFolderError, match=re.escape(f"{root / 'a' / 'deeper'} resolves outside")):
        list_folder(root)
    write_tree(tmp_path / "other", {"a/1.png": "rgb_png", "b/1.png": "rgb_png"})
    with pytest.raises(ImageFolderError, match=re.escape(f"{root / 'a' / 'deeper'} resolves outside")):
        list_folder(tmp_path / "other", root)  # in a test folder too


@pytest.mark.slow
def test_a_file_swapped_for_a_symlink_after_listing_is_refused_when_decoded(tmp_path):
    root = tmp_path / "train"
    write_tree(root, {"a/1.png": "rgb_png", "a/2.png": "rgb_png", "b/1.png": "rgb_png", "b/2.png": "rgb_png"})
    write_tree(tmp_path / "outside", {"secret.png": "rgb_png"})
    listing = list_folder(root, test_fraction=0.5)
    prep = Preprocessing(3, (6, 8))
    layout = prepared.plan_layout(listing.class_names, 2, 2, (3, 6, 8))
    out = tmp_path / "prepared.safetensors"
    labels = [torch.tensor(split[1]) for split in (listing.train, listing.test)]
    prepared.create_file(out, layout, *labels)
    swapped = Path(listing.test[0][0])
    swapped.unlink()
    swapped.symlink_to(tmp_path / "outside" / "secret.png")  # between listing and decoding
    refused = f"{swapped}: {swapped} resolves to {tmp_path / 'outside' / 'secret.png'}, outside {root}"
    with pytest.raises(ImageFolderError, match=re.escape(refused)):
        photo_writer.write_listing(out, layout, listing, prep, workers=1)


@pytest.mark.slow
def test_a_file_listed_again_is_decoded_once_and_copied(tmp_path, monkeypatch):
    root = tmp_path / "train"
    write_tree(root, {"a/1.png": "rgb_png", "b/1.png": "rgb_png"}, size=(12, 12))
    for index in range(2, 6):  # the same files again, by hard link and by symlink
        os.link(root / "a" / "1.png", root / "a" / f"{index}.png")
        (root / "b" / f"{index}.png").symlink_to(root / "b" / "1.png")
    log, real = tmp_path / "decoded.txt", photo_writer.load_image

    def logged(path, *args):  # in the forked worker: its list would not come back, a file does
        with open(log, "a") as out:
            out.write(f"{path}\n")
        return real(path, *args)

    monkeypatch.setattr(photo_writer, "load_image", logged)
    ref, calls = prepare_folder(root, tmp_path / "data", workers=1)
    decoded = [os.stat(line).st_ino for line in log.read_text().split()]
    assert sorted(decoded) == sorted(os.stat(root / name / "1.png").st_ino for name in "ab")  # once each
    data = load_tensors(ref.prepared_path)
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        for image, label in zip(images, labels):
            assert torch.equal(image, load_image(root / "ab"[label] / "1.png", ref.preprocessing))
    assert sum(count for count, _ in calls) == 10 and {total for _, total in calls} == {10}


# The stratified test split


def test_the_split_takes_a_seeded_fraction_of_every_class():
    labels = [0, 1, 2, 3] * 2 + [0] * 8 + [1] * 3  # 10, 5, 2 and 2 images
    train, test = stratified_split(labels, 0.2, seed=0)
    assert (
        sorted(train + test) == list(range(len(labels))) and train == sorted(train) and test == sorted(test)
    )
    assert Counter(labels[i] for i in test) == {0: 2, 1: 1, 2: 1, 3: 1}  # round(n * 0.2), at least one
    assert stratified_split(labels, 0.2, seed=0) == (train, test)
    assert any(stratified_split(labels, 0.2, seed=seed)[1] != test for seed in range(1, 6))
    train, test = stratified_split(labels, 0.9, seed=3)  # each class of two or more keeps one for training
    assert Counter(labels[i] for i in train) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert Counter(labels[i] for i in test) == {0: 9, 1: 4, 2: 1, 3: 1}


def test_a_class_of_one_image_stays_in_training_and_no_test_split_is_an_error():
    train, test = stratified_split([0, 0, 0, 1], 0.34, seed=0)
    assert 3 in train and len(test) == 1
    with pytest.raises(
        ImageFolderError, match="a test fraction of 0.5 leaves no test images; give --test-dir"
    ):
        stratified_split([0, 1, 2], 0.5, seed=0)


def test_a_folder_without_a_test_folder_is_split_by_class(tmp_path):
    root = tmp_path / "train"
    write_tree(root, {f"{name}/{k}.png": "grey_png" for name in ("a", "b") for k in range(5)})
    listing = list_folder(root, test_fraction=0.4, seed=7)
    assert Counter(listing.test[1]) == {0: 2, 1: 2} and Counter(listing.train[1]) == {0: 3, 1: 3}
    assert not set(listing.train[0]) & set(listing.test[0])
    assert listing.test_origin == f"{root} (stratified test split: fraction 0.4, seed 7)"
    assert list_folder(root, test_fraction=0.4, seed=7) == listing


# What a listing records


def test_listing_records_header_sizes_and_colour(tmp_path):
    root = tmp_path / "train"
    write_tree(root, {"a/1.png": "grey_png", "b/1.jpg": "grey_jpeg"})
    write_tree(root, {"a/2.png": "grey16_png"}, size=(10, 4))
    listing = list_folder(root, root)
    assert listing.sizes == {(6, 8), (10, 4)} and not listing.colour
    write_tree(root, {"b/2.jpg": "cmyk_jpeg"})
    assert list_folder(root, root).colour


def test_the_stamp_changes_with_any_listed_file(tmp_path):
    root = tmp_path / "train"
    write_tree(root, {"a/1.png": "rgb_png", "b/1.png": "rgb_png"})
    image = root / "a" / "1.png"
    first = list_folder(root, root).stamp
    assert list_folder(root, root).stamp == first
    listed = image.stat()
    os.utime(image, ns=(listed.st_atime_ns, listed.st_mtime_ns + 1_000_000_000))  # touched
    assert list_folder(root, root).stamp != first
    os.utime(image, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    assert list_folder(root, root).stamp == first  # what was listed, not when
    write_grey_png(image, noise(seed=9))  # rewritten: another size of file
    os.utime(image, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    assert image.stat().st_size != listed.st_size and list_folder(root, root).stamp != first
    renamed = list_folder(root, root).stamp
    image.rename(root / "a" / "2.png")
    assert list_folder(root, root).stamp not in (first, renamed)


# Decoding the listing into the prepared file


def prepare_folder(root: Path, data_dir: Path, workers: int) -> tuple[DatasetRef, list[tuple[int, int]]]:
    """prepare_dataset of the folder `root` at a 20x20 fallback size, with its progress calls."""
    calls = []
    ref = prepare_dataset(
        FolderSource(train_dir=root),
        data_dir,
        shape=Shape(fallback=20),
        workers=workers,
        progress=lambda images, total: calls.append((images, total)),
    )
    return ref, calls


@pytest.mark.slow
def test_prepared_images_are_load_image_of_each_file_whatever_the_workers(tmp_path, monkeypatch):
    root = tmp_path / "train"
    # Every kind of file (19 kinds) in each class, of three sizes: no common size.
    write_class_folders(root, ["a", "b", "c"], per_class=19, sizes=[(20, 28), (24, 24), (30, 18)])
    monkeypatch.setattr(photo_writer, "_CHUNK", 4)  # several chunks per split, at offsets other than 0
    listing = list_folder(root)
    assert len(listing.sizes) > 1 and listing.colour
    one, one_calls = prepare_folder(root, tmp_path / "one", workers=1)
    two, two_calls = prepare_folder(root, tmp_path / "two", workers=2)
    assert Path(one.prepared_path).read_bytes() == Path(two.prepared_path).read_bytes()
    assert one.sha256 == two.sha256 and one.image_size == (20, 20) and one.channels == 3
    assert one.class_names == ("a", "b", "c") and (one.train_size, one.test_size) == (45, 12)
    chunks = [(4, 57)] * 11 + [(1, 57)] + [(4, 57)] * 3  # train 45 = 11 x 4 + 1, test 12 = 3 x 4
    assert sorted(one_calls) == sorted(two_calls) == sorted(chunks)
    data = load_tensors(two.prepared_path)
    for split in ("train", "test"):
        paths, labels = getattr(listing, split)
        expected = torch.stack([load_image(Path(path), one.preprocessing) for path in paths])
        assert torch.equal(getattr(data, f"{split}_images"), expected)
        assert getattr(data, f"{split}_labels").tolist() == list(labels)


@pytest.mark.slow
def test_exif_rotated_photos_are_listed_at_their_displayed_size(tmp_path):
    for index in range(4):
        folder = tmp_path / "train" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        write_kind("exif_jpeg", folder / f"{index}", noise((12, 16), index))
    listing = list_folder(tmp_path / "train", test_fraction=0.5)
    assert listing.sizes == {(12, 16)}  # (height, width) as a viewer shows them, as decoded
    source = FolderSource(train_dir=tmp_path / "train", test_fraction=0.5)
    ref = prepare_dataset(source, tmp_path / "data")
    assert ref.image_size == (12, 16)


def test_a_test_folder_may_hold_one_class_and_hidden_files_are_not_images(tmp_path):
    write_tree(tmp_path / "train", {"cat/a.png": "rgb_png", "dog/b.png": "rgb_png"})
    write_tree(tmp_path / "test", {"cat/c.png": "rgb_png", "cat/.thumbs/d.png": "rgb_png"})
    (tmp_path / "test" / "cat" / "._c.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    listing = list_folder(tmp_path / "train", tmp_path / "test")
    assert [Path(p).name for p in listing.test[0]] == ["c.png"] and listing.test[1] == (0,)
