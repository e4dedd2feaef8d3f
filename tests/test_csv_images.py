import pytest
import torch
from conftest import write_csv, write_image_folder
from torchvision.io import write_png

from tasks.data.csv_images import CsvDatasetError, label_set, load_csv_dataset


def test_reads_pngs_with_string_labels_and_header(png_dataset):
    data = load_csv_dataset(**png_dataset)
    assert data.class_names == ("left", "right")
    assert data.train_images.shape == (36, 1, 12, 12) and data.train_images.dtype == torch.uint8
    assert data.test_labels.tolist() == [0, 1] * 6


def test_integer_labels_without_header_keep_their_numbers(tmp_path):
    rows = write_image_folder(tmp_path, 8, channels=3)
    write_csv(tmp_path / "train.csv", [(n, label + 3) for n, label in rows], header=False)
    data = load_csv_dataset(tmp_path / "train.csv", tmp_path / "train.csv", tmp_path)
    assert data.class_names == ("3", "4")
    assert data.train_images.shape == (8, 3, 12, 12)


def test_label_set_orders_numbers_numerically():
    assert label_set(["10", "9", "2"]) == ("2", "9", "10")
    assert label_set(["b", "a"]) == ("a", "b")


def test_missing_image_names_its_row(png_dataset):
    rows = [("img/000.png", "left"), ("img/missing.png", "right")]
    write_csv(png_dataset["train_csv"], rows)
    with pytest.raises(CsvDatasetError, match=r"train.csv row 3: image 'img/missing.png' not found"):
        load_csv_dataset(**png_dataset)


def test_unknown_test_label_names_its_row(png_dataset):
    write_csv(png_dataset["test_csv"], [("img/000.png", "left"), ("img/001.png", "up")])
    with pytest.raises(CsvDatasetError, match=r"test.csv row 3: label 'up' is not in the label set"):
        load_csv_dataset(**png_dataset)


def test_explicit_classes_reject_other_training_labels(png_dataset):
    with pytest.raises(CsvDatasetError, match="label 'right' is not in the label set"):
        load_csv_dataset(**png_dataset, classes=["left"])


def test_images_of_another_size_are_rejected(png_dataset):
    write_png(torch.zeros(1, 5, 5, dtype=torch.uint8), str(png_dataset["image_root"] / "img" / "001.png"))
    with pytest.raises(CsvDatasetError, match=r"row 3: image is \(5, 5\) pixels"):
        load_csv_dataset(**png_dataset)


def test_undecodable_file_names_its_row(png_dataset):
    image = png_dataset["image_root"] / "img" / "002.png"
    image.write_bytes(image.read_bytes()[:40])  # a sound header, then the data cut short
    with pytest.raises(CsvDatasetError, match="row 4: cannot decode"):
        load_csv_dataset(**png_dataset)
