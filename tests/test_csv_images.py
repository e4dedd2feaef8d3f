import re

import pytest
import torch
from conftest import write_csv, write_image_folder
from PIL import Image
from torchvision.io import decode_png, read_file, write_png

from tasks.data.csv_images import CsvDatasetError, iter_rows, label_set, read_rows
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.decoding import load_image
from tasks.data.photos import ImageFolderError, list_csv
from tasks.data.sources import CsvSource, Shape


def png_pixels(path):
    return decode_png(read_file(str(path)))


@pytest.mark.slow
def test_reads_pngs_with_string_labels_and_header(png_dataset, tmp_path):
    listing = list_csv(**png_dataset)
    assert listing.class_names == ("left", "right")
    assert len(listing.train[0]) == 36 and listing.test[1] == (0, 1) * 6
    assert listing.sizes == {(12, 12)} and not listing.colour
    ref = prepare_dataset(CsvSource(**png_dataset), tmp_path / "data")
    data = load_tensors(ref.prepared_path)
    assert data.train_images.shape == (36, 1, 12, 12) and data.train_images.dtype == torch.uint8
    assert data.test_labels.tolist() == [0, 1] * 6
    # Images of the common size are stored as the file holds them, in CSV order.
    root = png_dataset["image_root"]
    assert torch.equal(data.train_images[5], png_pixels(root / "img" / "005.png"))
    assert torch.equal(data.test_images[0], png_pixels(root / "img" / "036.png"))


@pytest.mark.slow
def test_integer_labels_without_header_keep_their_numbers(tmp_path):
    rows = write_image_folder(tmp_path, 8, channels=3)
    write_csv(tmp_path / "train.csv", [(n, label + 3) for n, label in rows], header=False)
    options = {
        "train_csv": tmp_path / "train.csv",
        "test_csv": tmp_path / "train.csv",
        "image_root": tmp_path,
    }
    listing = list_csv(**options)
    assert listing.class_names == ("3", "4") and listing.train[1] == (0, 1) * 4 and listing.colour
    ref = prepare_dataset(CsvSource(**options), tmp_path / "data")
    assert ref.class_names == ("3", "4")
    assert load_tensors(ref.prepared_path).train_images.shape == (8, 3, 12, 12)


def test_label_set_orders_numbers_numerically():
    assert label_set(["10", "9", "2"]) == ("2", "9", "10")
    assert label_set(["b", "a"]) == ("a", "b")


def test_rows_keep_their_line_label_and_header(png_dataset):
    rows = read_rows(png_dataset["test_csv"], png_dataset["image_root"])
    assert [row.line for row in rows[:2]] == [2, 3] and rows[1].label == "right"
    assert rows[0].header[1:3] == (12, 12)


def test_missing_image_names_its_row(png_dataset):
    rows = [("img/000.png", "left"), ("img/missing.png", "right")]
    write_csv(png_dataset["train_csv"], rows)
    with pytest.raises(CsvDatasetError, match=r"train.csv row 3: image 'img/missing.png' not found"):
        list_csv(**png_dataset)


def test_unknown_test_label_names_its_row(png_dataset):
    write_csv(png_dataset["test_csv"], [("img/000.png", "left"), ("img/001.png", "up")])
    with pytest.raises(CsvDatasetError, match=r"test.csv row 3: label 'up' is not in the label set"):
        list_csv(**png_dataset)


def test_explicit_classes_reject_other_training_labels(png_dataset):
    with pytest.raises(CsvDatasetError, match="label 'right' is not in the label set"):
        list_csv(**png_dataset, classes=["left"])
    assert list_csv(**png_dataset, classes=["right", "left"]).train[1][:2] == (1, 0)


@pytest.mark.slow
def test_images_of_another_size_are_resized_to_the_fallback_or_asked_size(png_dataset, tmp_path):
    small = png_dataset["image_root"] / "img" / "001.png"
    write_png(torch.full((1, 5, 5), 200, dtype=torch.uint8), str(small))
    assert list_csv(**png_dataset).sizes == {(12, 12), (5, 5)}
    # No common size: every image goes to the fallback size.
    ref = prepare_dataset(CsvSource(**png_dataset), tmp_path / "data")
    assert ref.image_size == (128, 128) and ref.preprocessing.size == (128, 128)
    data = load_tensors(ref.prepared_path)
    assert data.train_images.shape == (36, 1, 128, 128)
    assert torch.equal(data.train_images[1], load_image(small, ref.preprocessing))
    assert torch.equal(data.train_images[0], load_image(small.with_name("000.png"), ref.preprocessing))
    # An asked size: the odd one out is resized, the others are kept as they are.
    ref = prepare_dataset(CsvSource(**png_dataset), tmp_path / "data", shape=Shape(size=(12, 12)))
    data = load_tensors(ref.prepared_path)
    assert ref.image_size == (12, 12) and data.train_images.shape == (36, 1, 12, 12)
    assert torch.equal(data.train_images[1], torch.full((1, 12, 12), 200, dtype=torch.uint8))
    assert torch.equal(data.train_images[2], png_pixels(small.with_name("002.png")))


@pytest.mark.slow
def test_undecodable_file_names_its_file(png_dataset, tmp_path):
    image = png_dataset["image_root"] / "img" / "002.png"
    image.write_bytes(image.read_bytes()[:40])  # a sound header, then the data cut short
    assert len(list_csv(**png_dataset).train[0]) == 36  # the header passes the listing's check
    message = rf"^{re.escape(str(image))}: it cannot be decoded: "
    with pytest.raises(ImageFolderError, match=message):
        prepare_dataset(CsvSource(**png_dataset), tmp_path / "data")
    assert not list((tmp_path / "data" / "prepared").glob("*.safetensors"))
    assert not list((tmp_path / "data" / "prepared").glob(".*.part"))


def test_rows_read_from_their_offset_match_a_read_from_the_top(tmp_path):
    for name in ("a.png", "b\nc.png", "d,e.png", "é.png"):
        write_png(torch.zeros(1, 4, 4, dtype=torch.uint8), str(tmp_path / name))
    # A byte order mark, CRLF, a blank line, quoted cells spanning lines, a lone CR, no final newline.
    text = '\ufeffimage,label\r\n"a.png",x\r\n\r\n"b\nc.png","l\r\nm"\r\né.png,y\r"d,e.png",z\na.png'
    (tmp_path / "t.csv").write_bytes(text.encode())
    rows = list(iter_rows(tmp_path / "t.csv", tmp_path, False))
    assert [(row.line, row.path.name, row.label) for row in rows] == [
        (2, "a.png", "x"),
        (4, "b\nc.png", "l\r\nm"),
        (5, "é.png", "y"),
        (6, "d,e.png", "z"),
        (7, "a.png", ""),
    ]
    assert rows[0].offset == len("\ufeffimage,label\r\n".encode())
    for k, row in enumerate(rows):
        rest = iter_rows(
            tmp_path / "t.csv", tmp_path, False, start=(row.offset, row.line - 1), check_files=False
        )
        assert [(r.line, r.path, r.label, r.offset) for r in rest] == [r[:3] + r[4:] for r in rows[k:]]


def test_rows_naming_formats_that_are_not_read_are_refused_not_taken_for_a_header(png_dataset):
    Image.new("L", (4, 4)).save(png_dataset["image_root"] / "img" / "x.bmp")
    formats = re.escape("images must be PNG, JPEG, GIF or WebP (.gif, .jpeg, .jpg, .png, .webp)")
    first, second = (
        [("img/x.bmp", "left"), ("img/000.png", "left")],
        [("img/000.png", "left"), ("x.TIF", "l")],
    )
    for rows, line, name, suffix in ((first, 1, "img/x.bmp", ".bmp"), (second, 2, "x.TIF", ".tif")):
        write_csv(png_dataset["test_csv"], rows, header=False)
        with pytest.raises(
            CsvDatasetError, match=rf"test.csv row {line}: image '{name}' is a {suffix} file.*{formats}"
        ):
            read_rows(png_dataset["test_csv"], png_dataset["image_root"])
    write_csv(png_dataset["test_csv"], [("img/000.png", "left")], header=True)  # "image,label": a header
    assert [row.line for row in read_rows(png_dataset["test_csv"], png_dataset["image_root"])] == [2]
