import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import write_png

from tasks.csv_images import CsvDatasetError
from tasks.images import ImageData
from tasks.prediction import (
    COLUMNS,
    Inputs,
    PredictionError,
    RegisteredModel,
    check_labels,
    csv_inputs,
    dataset_inputs,
    find_registered,
    folder_inputs,
    merge_csvs,
    partitions,
    predict_to_csv,
    predictions_table,
    tally,
    to_pixels,
)


def decoded(inputs, size=1000):
    """All of `inputs` in one list per field: sources, labels, images."""
    batches = list(inputs.batches(size))
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
    assert [len(batch[0]) for batch in parts[1].batches(4)] == [4, 4, 2]
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


def test_pixels_are_scaled_and_channels_adapted():
    grey, rgb = torch.full((1, 4, 4), 255, dtype=torch.uint8), torch.zeros((3, 4, 4), dtype=torch.uint8)
    pixels = to_pixels([grey, rgb], ["a", "b"], (3, 4, 4))
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 4, 4) and pixels.max() == 1.0
    assert to_pixels([grey, rgb], ["a", "b"], (1, 4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(PredictionError, match=r"a: image is \(4, 4\) pixels, the model takes \(8, 8\)"):
        to_pixels([grey, rgb], ["a", "b"], (1, 8, 8))


def test_table_and_tally():
    logits = np.array([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    table = predictions_table(logits, ["x", "y", "z"], ["cat", "cat", None], ["cat", "dog"])
    assert list(table.columns) == COLUMNS
    assert table["predicted_class"].tolist() == ["cat", "dog", "cat"]
    assert table["confidence"][0] == pytest.approx(np.exp(3) / (np.exp(3) + 1))
    assert tally(table) == {"images": 3, "labelled": 2, "correct": 1}


class PixelSum:
    """A stand-in pyfunc: class 1 when the image is bright; records batch sizes."""

    def __init__(self):
        self.batches = []

    def predict(self, pixels):
        self.batches.append(len(pixels))
        bright = pixels.reshape(len(pixels), -1).mean(1) > 0.5
        return np.stack([~bright, bright], axis=1).astype(np.float32)


def test_streamed_parts_merge_into_the_table_of_one_pass(tmp_path):
    images = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    images[::3] = 255
    labels = torch.zeros(10, dtype=torch.int64)  # all "dark"
    path = tmp_path / "t.pt"
    torch.save(ImageData(images, labels, images, labels, ("dark", "bright"))._asdict(), path)
    inputs = Inputs("dataset", str(path), 0, 10, dataset="t", class_names=("dark", "bright"))
    registered = RegisteredModel("models:/m/1", "1", "run", ("dark", "bright"), (1, 2, 2))

    model = PixelSum()
    whole = predict_to_csv(model, inputs, registered, 4, tmp_path / "whole.csv")
    assert model.batches == [4, 4, 2] and whole == {"images": 10, "labelled": 10, "correct": 6}
    parts = [tmp_path / f"p{k}.csv" for k in range(3)]
    counts = [
        predict_to_csv(PixelSum(), p, registered, 3, out) for p, out in zip(partitions(inputs, 4), parts)
    ]
    merge_csvs(parts, tmp_path / "merged.csv")
    assert (tmp_path / "merged.csv").read_text() == (tmp_path / "whole.csv").read_text()
    assert [c["images"] for c in counts] == [4, 4, 2]
    table = pd.read_csv(tmp_path / "merged.csv")
    assert table["path"].tolist() == [f"t/test/{k}" for k in range(10)]


def test_a_bad_image_leaves_no_output(tmp_path):
    registered = RegisteredModel("models:/m/1", "1", "run", ("a", "b"), (1, 8, 8))
    write_png(torch.zeros(1, 4, 4, dtype=torch.uint8), str(tmp_path / "small.png"))
    inputs = folder_inputs(tmp_path)
    with pytest.raises(PredictionError, match="small.png: image is"):
        predict_to_csv(PixelSum(), inputs, registered, 2, tmp_path / "out" / "p.csv")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_model_or_alias_is_a_clear_error(mlflow_store):
    with pytest.raises(PredictionError, match="no registered model 'ghost'"):
        find_registered("ghost", "champion")
    from mlflow import MlflowClient

    MlflowClient().create_registered_model("real")
    with pytest.raises(PredictionError, match="model 'real' has no alias 'champion' \\(aliases: none\\)"):
        find_registered("real", "champion")


def test_write_png_helper_matches_decoder(tmp_path):
    write_png(torch.zeros(3, 5, 5, dtype=torch.uint8), str(tmp_path / "a.png"))
    assert decoded(folder_inputs(tmp_path))[2][0].shape == (3, 5, 5)
