import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import write_png

from tasks.data.images import ImageData
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
