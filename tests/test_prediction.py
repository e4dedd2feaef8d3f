import numpy as np
import pytest
import torch
from torchvision.io import write_png

from tasks.csv_images import CsvDatasetError
from tasks.prediction import (
    Inputs,
    PredictionError,
    accuracy,
    csv_inputs,
    folder_inputs,
    load_registered,
    predictions_table,
    to_pixels,
)


def test_csv_without_labels_and_folder_inputs(png_dataset, tmp_path):
    csv = tmp_path / "unlabelled.csv"
    csv.write_text("img/000.png\nimg/001.png,\n")
    inputs = csv_inputs(csv, png_dataset["image_root"])
    assert inputs.labels == [None, None] and len(inputs.images) == 2
    folder = folder_inputs(png_dataset["image_root"] / "img")
    assert len(folder.images) == 48 and folder.sources[0].endswith("000.png")


def test_missing_inputs_are_named(png_dataset, tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("image,label\nimg/000.png,left\nimg/nope.png,left\n")
    with pytest.raises(CsvDatasetError, match="row 3: image 'img/nope.png' not found"):
        csv_inputs(csv, png_dataset["image_root"])
    with pytest.raises(PredictionError, match="does not exist"):
        folder_inputs(tmp_path / "absent")


def test_pixels_are_scaled_and_channels_adapted():
    grey, rgb = torch.full((1, 4, 4), 255, dtype=torch.uint8), torch.zeros((3, 4, 4), dtype=torch.uint8)
    inputs = Inputs([grey, rgb], ["a", "b"], [None, None])
    pixels = to_pixels(inputs, (3, 4, 4))
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 4, 4) and pixels.max() == 1.0
    assert to_pixels(inputs, (1, 4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(PredictionError, match=r"a: image is \(4, 4\) pixels, the model takes \(8, 8\)"):
        to_pixels(inputs, (1, 8, 8))


def test_table_and_accuracy():
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    inputs = Inputs([torch.zeros(1)] * 3, ["x", "y", "z"], ["cat", "cat", None])
    table = predictions_table(logits, inputs, ["cat", "dog"])
    assert table["predicted_class"].tolist() == ["cat", "dog", "cat"]
    assert table["confidence"][0] == pytest.approx(np.exp(3) / (np.exp(3) + 1))
    assert accuracy(table) == 0.5
    assert (
        accuracy(predictions_table(logits, Inputs([], ["x", "y", "z"], [None] * 3), ["cat", "dog"])) is None
    )
    with pytest.raises(PredictionError, match=r"labels \['bird'\] are not among"):
        predictions_table(logits, Inputs([], ["x", "y", "z"], ["bird", None, None]), ["cat", "dog"])


def test_missing_model_or_alias_is_a_clear_error(mlflow_store):
    with pytest.raises(PredictionError, match="no registered model 'ghost'"):
        load_registered("ghost", "champion")
    from mlflow import MlflowClient

    MlflowClient().create_registered_model("real")
    with pytest.raises(PredictionError, match="model 'real' has no alias 'champion' \\(aliases: none\\)"):
        load_registered("real", "champion")


def test_write_png_helper_matches_decoder(tmp_path):
    write_png(torch.zeros(3, 5, 5, dtype=torch.uint8), str(tmp_path / "a.png"))
    assert folder_inputs(tmp_path).images[0].shape == (3, 5, 5)
