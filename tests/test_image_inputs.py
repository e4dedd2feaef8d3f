import re

import pytest
import torch
from torchvision.io import write_png

from tasks.data.csv_images import CsvDatasetError
from tasks.data.decoding import Preprocessing, load_image
from tasks.predict.image_inputs import (
    PredictionError,
    check_labels,
    csv_inputs,
    dataset_inputs,
    folder_inputs,
    partitions,
)

GREY_12 = Preprocessing(1, (12, 12))  # the png_dataset's images as they are


def decoded(inputs, size=1000, prep=GREY_12):
    """All of `inputs` in one list per field: sources, labels, images."""
    batches = list(inputs.batches(size, prep))
    return [sum((list(batch[field]) for batch in batches), []) for field in range(3)]


def test_csv_without_labels_and_folder_inputs(png_dataset, tmp_path):
    csv = tmp_path / "unlabelled.csv"
    csv.write_text("img/000.png\nimg/001.png,\n")
    sources, labels, images = decoded(csv_inputs(csv, png_dataset["image_root"], ["left", "right"]))
    assert labels == [None, None] and len(images) == 2 and sources[1].endswith("img/001.png")
    folder = folder_inputs(png_dataset["image_root"] / "img")
    assert len(folder) == 48 and decoded(folder)[0][0].endswith("000.png")
    assert torch.equal(decoded(folder.part(5, 7))[2][1], decoded(folder)[2][6])


def test_csv_parts_stream_their_own_rows_in_batches(png_dataset):
    inputs = csv_inputs(png_dataset["train_csv"], png_dataset["image_root"], ["left", "right"])
    whole = decoded(inputs)
    assert len(inputs) == 36 and whole[1][:2] == ["left", "right"]
    parts = partitions(inputs, 10)
    assert [len(p) for p in parts] == [10, 10, 10, 6]
    assert [len(batch[0]) for batch in parts[1].batches(4, GREY_12)] == [4, 4, 2]
    assert sum((decoded(p)[0] for p in parts), []) == whole[0]


def test_missing_inputs_are_named(png_dataset, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("image,label\nimg/000.png,left\nimg/nope.png,left\n")
    with pytest.raises(CsvDatasetError, match="row 3: image 'img/nope.png' not found"):
        csv_inputs(csv, png_dataset["image_root"], ["left"])
    with pytest.raises(PredictionError, match="does not exist"):
        folder_inputs(tmp_path / "absent")
    with pytest.raises(PredictionError, match=r"labels \['right'\] are not among the model's classes"):
        csv_inputs(png_dataset["test_csv"], png_dataset["image_root"], ["left", "up"])
    check_labels({None, "cat"}, ["cat", "dog"])


def test_dataset_parts_read_their_own_slice_of_the_test_split(tmp_path):
    inputs = dataset_inputs("synthetic", tmp_path, [f"pattern-{k}" for k in range(10)])
    parts = partitions(inputs, 300)
    assert [len(p) for p in parts] == [300, 300, 300, 100] and parts[1].start == 300
    sources, labels, images = decoded(parts[2])
    assert sources[0] == "synthetic/test/600" and labels[0] in inputs.class_names
    assert torch.equal(torch.stack(images), torch.stack(decoded(inputs)[2][600:900]))
    with pytest.raises(PredictionError, match="are not among the model's classes"):
        dataset_inputs("synthetic", tmp_path, ["cat", "dog"])


def test_files_are_decoded_into_the_models_preprocessing(tmp_path):
    image = torch.arange(3 * 5 * 5, dtype=torch.uint8).reshape(3, 5, 5)
    write_png(image, str(tmp_path / "a.png"))
    assert torch.equal(decoded(folder_inputs(tmp_path), prep=Preprocessing(3, (5, 5)))[2][0], image)
    prep = Preprocessing(1, (8, 6), "pad")
    [resized] = decoded(folder_inputs(tmp_path), prep=prep)[2]
    assert resized.shape == (1, 8, 6) and torch.equal(resized, load_image(tmp_path / "a.png", prep))


def test_a_size_given_at_listing_refuses_other_sizes_by_header(png_dataset, tmp_path):
    root = png_dataset["image_root"]
    write_png(torch.zeros(1, 5, 7, dtype=torch.uint8), str(root / "img" / "047.png"))
    text = "image is (5, 7) pixels, the model takes (12, 12) (height, width); "
    text += "prediction resizes images as training did unless --no-resize is given"
    with pytest.raises(PredictionError, match=re.escape(f"{root / 'img' / '047.png'}: {text}")):
        folder_inputs(root / "img", size=(12, 12))
    with pytest.raises(PredictionError, match=re.escape(f"047.png: {text}")):
        csv_inputs(png_dataset["test_csv"], root, ["left", "right"], size=(12, 12))
    assert len(csv_inputs(png_dataset["train_csv"], root, ["left", "right"], size=(12, 12))) == 36
    assert len(folder_inputs(root / "img")) == 48  # no size: any size will do
