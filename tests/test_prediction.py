import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import write_png

from tasks.data import prepared
from tasks.data.csv_images import CsvDatasetError
from tasks.data.decoding import Preprocessing, preprocess
from tasks.predict.image_inputs import Inputs, PredictionError, folder_inputs, partitions
from tasks.predict.prediction import (
    COLUMNS,
    RegisteredModel,
    add_tallies,
    find_registered,
    merge_csvs,
    predict_to_csv,
    predictions_table,
    tally,
    to_pixels,
)


def test_pixels_are_scaled_and_channels_adapted():
    grey, rgb = torch.full((1, 4, 4), 255, dtype=torch.uint8), torch.zeros((3, 4, 4), dtype=torch.uint8)
    rgb[0] = 90
    pixels = to_pixels([grey, rgb], Preprocessing(3, (4, 4)))
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 4, 4) and pixels.max() == 1.0
    np.testing.assert_array_equal(pixels[1], rgb.float().numpy() / 255)  # already in shape: as it is
    assert to_pixels([grey, rgb], Preprocessing(1, (4, 4))).shape == (2, 1, 4, 4)


def test_pixels_of_another_size_are_preprocessed_as_in_training():
    image = torch.arange(3 * 16 * 12, dtype=torch.int64).reshape(3, 16, 12).remainder(251).to(torch.uint8)
    for prep in (
        Preprocessing(3, (8, 8)),
        Preprocessing(1, (8, 8), "pad"),
        Preprocessing(3, (6, 9), "stretch"),
    ):
        pixels = to_pixels([image, image], prep)
        assert pixels.shape == (2, prep.channels, *prep.size) and pixels.dtype == np.float32
        np.testing.assert_array_equal(pixels[1], preprocess(image, prep).float().numpy() / 255)
    crop, pad = (
        to_pixels([image], Preprocessing(3, (8, 8)))[0],
        to_pixels([image], Preprocessing(3, (8, 8), "pad"))[0],
    )
    assert not np.array_equal(crop, pad) and (pad[:, :, 0] == 0).all()  # pad: black bars left and right


def test_table_and_tally():
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    table = predictions_table(logits, ["x", "y", "z"], ["cat", "cat", None], ["cat", "dog"])
    assert list(table.columns) == COLUMNS
    assert table["predicted_class"].tolist() == ["cat", "dog", "cat"]
    assert table["confidence"][0] == pytest.approx(np.exp(3) / (np.exp(3) + 1))
    assert tally(table) == {"images": 3, "labelled": 2, "correct": 1, "classes": {"cat": 2, "dog": 1}}
    total = add_tallies([tally(table), tally(table.iloc[1:])])
    assert total == {"images": 5, "labelled": 3, "correct": 1, "classes": {"cat": 3, "dog": 2}}


class PixelSum:
    """A stand-in pyfunc: class 1 when the image is bright; records batch sizes."""

    def __init__(self):
        self.batches = []

    def predict(self, pixels):
        self.batches.append(len(pixels))
        bright = pixels.reshape(len(pixels), -1).mean(1) > 0.5
        return np.stack([~bright, bright], axis=1).astype(np.float32)


def write_prepared(path, images, labels, class_names):
    """A prepared dataset file holding `images` and `labels` as both splits."""
    layout = prepared.plan_layout(class_names, len(labels), len(labels), tuple(images.shape[1:]))
    prepared.create_file(path, layout, labels, labels)
    for split in ("train", "test"):
        prepared.write_images(path, layout, split, 0, images)


def test_streamed_parts_merge_into_the_table_of_one_pass(tmp_path):
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    images[::3] = 255
    labels = torch.zeros(10, dtype=torch.int64)  # all "dark"
    path = tmp_path / "t.safetensors"
    write_prepared(path, images, labels, ("dark", "bright"))
    inputs = Inputs("dataset", str(path), 0, 10, dataset="t", class_names=("dark", "bright"))
    prep = Preprocessing(1, (2, 2))
    registered = RegisteredModel("models:/m/1", "1", "run", ("dark", "bright"), (1, 2, 2), prep)

    model = PixelSum()
    whole = predict_to_csv(model, inputs, registered, 4, tmp_path / "whole.csv")
    assert model.batches == [4, 4, 2] and whole == {
        "images": 10,
        "labelled": 10,
        "correct": 6,
        "classes": {"bright": 4, "dark": 6},
    }
    parts = [tmp_path / f"p{k}.csv" for k in range(3)]
    counts = [
        predict_to_csv(PixelSum(), p, registered, 3, out) for p, out in zip(partitions(inputs, 4), parts)
    ]
    merge_csvs(parts, tmp_path / "merged.csv")
    assert (tmp_path / "merged.csv").read_text() == (tmp_path / "whole.csv").read_text()
    assert [c["images"] for c in counts] == [4, 4, 2] and add_tallies(counts) == whole
    table = pd.read_csv(tmp_path / "merged.csv")
    assert table["path"].tolist() == [f"t/test/{k}" for k in range(10)]


class Shapes(PixelSum):
    """PixelSum that also records the shape of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def predict(self, pixels):
        self.shapes.append(pixels.shape)
        return super().predict(pixels)


def test_files_of_any_size_reach_the_model_in_its_preprocessing(tmp_path):
    write_png(torch.full((1, 4, 4), 255, dtype=torch.uint8), str(tmp_path / "a.png"))
    write_png(torch.zeros((3, 12, 20), dtype=torch.uint8), str(tmp_path / "b.png"))
    registered = RegisteredModel("models:/m/1", "1", "run", ("a", "b"), (1, 8, 8), Preprocessing(1, (8, 8)))
    model = Shapes()
    counts = predict_to_csv(model, folder_inputs(tmp_path), registered, 2, tmp_path / "out" / "p.csv")
    assert model.shapes == [(2, 1, 8, 8)] and counts["classes"] == {"b": 1, "a": 1}


def test_a_bad_image_leaves_no_output(tmp_path):
    registered = RegisteredModel("models:/m/1", "1", "run", ("a", "b"), (1, 8, 8), Preprocessing(1, (8, 8)))
    write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(tmp_path / "a.png"))
    write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(tmp_path / "b.png"))
    (tmp_path / "b.png").write_bytes((tmp_path / "b.png").read_bytes()[:40])  # header only
    inputs = folder_inputs(tmp_path)  # listing reads headers only: both pass
    model = PixelSum()
    with pytest.raises(CsvDatasetError, match=r"row 2: .*b.png: it cannot be decoded"):
        predict_to_csv(model, inputs, registered, 1, tmp_path / "out" / "p.csv")
    assert model.batches == [1]  # a.png was predicted, and its rows written, before b.png failed
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_model_or_alias_is_a_clear_error(mlflow_store):
    with pytest.raises(PredictionError, match="no registered model 'ghost'"):
        find_registered("ghost", "champion")
    from mlflow import MlflowClient

    MlflowClient().create_registered_model("real")
    with pytest.raises(PredictionError, match="model 'real' has no alias 'champion' \\(aliases: none\\)"):
        find_registered("real", "champion")
