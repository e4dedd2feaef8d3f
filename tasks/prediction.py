"""Batch prediction with a registered model, streamed: images are decoded, predicted and written
chunk by chunk, so memory does not grow with the number of images."""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from torchvision.transforms.v2.functional import rgb_to_grayscale

from tasks.csv_images import IMAGE_SUFFIXES, Row, decode_rows, read_rows
from tasks.datasets import load_tensors, prepare_dataset
from tasks.files import atomic_output
from tasks.tracking import get_client

COLUMNS = ["path", "predicted_index", "predicted_class", "confidence", "true_label", "correct"]


class PredictionError(ValueError):
    """The model, alias or images asked for cannot be used."""


@dataclass(frozen=True)
class Inputs:
    """Images to predict, named but not decoded: a part of them is small enough to send to a worker.

    Files are decoded from their paths; a dataset's test images are read by index from its
    prepared tensors, starting at `offset`.
    """

    sources: tuple[str, ...]
    labels: tuple[Optional[str], ...]
    origin: str  # the CSV, folder or dataset, for error messages
    tensors_path: Optional[str] = None
    offset: int = 0

    def __len__(self) -> int:
        return len(self.sources)

    def part(self, start: int, stop: int) -> "Inputs":
        """The images start..stop (a slice, like a list's)."""
        return replace(
            self, sources=self.sources[start:stop], labels=self.labels[start:stop], offset=self.offset + start
        )

    def images(self) -> list[torch.Tensor]:
        """Decodes every image of these inputs to uint8 (C, H, W)."""
        if self.tensors_path:
            return list(load_tensors(self.tensors_path).test_images[self.offset : self.offset + len(self)])
        rows = [Row(self.offset + i + 1, Path(source), "") for i, source in enumerate(self.sources)]
        return decode_rows(rows, Path(self.origin))


@dataclass(frozen=True)
class RegisteredModel:
    """A registry version pinned by number (an alias may move mid-run) and what predicting needs."""

    uri: str
    version: str
    source_run_id: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]


def find_registered(name: str, alias: str) -> RegisteredModel:
    """Resolves `models:/name@alias`; a missing name or alias is a PredictionError saying what exists."""
    client = get_client()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        try:
            aliases = sorted(client.get_registered_model(name).aliases)
        except MlflowException:
            raise PredictionError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}") from error
        raise PredictionError(
            f"model {name!r} has no alias {alias!r} (aliases: {aliases or 'none'})"
        ) from error
    uri = f"models:/{name}/{version.version}"
    info = mlflow.models.get_model_info(uri)
    return RegisteredModel(
        uri=uri,
        version=str(version.version),
        source_run_id=version.run_id,
        class_names=tuple(info.metadata["class_names"]),
        input_shape=tuple(info.signature.inputs.inputs[0].shape[1:]),
    )


@functools.lru_cache(maxsize=4)
def load_pyfunc(tracking_uri: str, model_uri: str) -> Any:
    """The pyfunc model (its predict returns (N, classes) logits), loaded once per process and store."""
    return mlflow.pyfunc.load_model(model_uri)


def csv_inputs(csv_path: Path, image_root: Path) -> Inputs:
    """Images named by a CSV (labels optional); a missing image names its row."""
    rows = read_rows(csv_path, image_root, labels_required=False)
    return Inputs(
        tuple(str(row.path) for row in rows), tuple(row.label or None for row in rows), str(csv_path)
    )


def folder_inputs(folder: Path) -> Inputs:
    """Every image file directly in `folder`, in name order."""
    if not folder.is_dir():
        raise PredictionError(f"image folder {folder} does not exist")
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PredictionError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return Inputs(tuple(paths), (None,) * len(paths), str(folder))


def dataset_inputs(name: str, data_dir: Path, mirror: Optional[str] = None) -> Inputs:
    """The test split of a named dataset, labelled."""
    dataset = prepare_dataset(name, data_dir, mirror=mirror)
    labels = load_tensors(dataset.tensors_path).test_labels.tolist()
    return Inputs(
        tuple(f"{name}/test/{i}" for i in range(len(labels))),
        tuple(dataset.class_names[k] for k in labels),
        name,
        tensors_path=dataset.tensors_path,
    )


def check_labels(inputs: Inputs, class_names: Sequence[str]) -> None:
    """Fails before any prediction when a known label is not one of the model's classes."""
    unknown = {label for label in inputs.labels if label is not None} - set(class_names)
    if unknown:
        raise PredictionError(
            f"labels {sorted(unknown)} are not among the model's classes {list(class_names)}"
        )


def partitions(inputs: Inputs, size: int) -> list[Inputs]:
    """Consecutive parts of at most `size` images, in input order."""
    return [inputs.part(start, start + size) for start in range(0, len(inputs), size)]


def to_pixels(images: list[torch.Tensor], sources: Sequence[str], shape: tuple[int, int, int]) -> np.ndarray:
    """float32 pixels in [0, 1] shaped for the model; grey and RGB are converted as needed."""
    channels, size = shape[0], tuple(shape[1:])
    ready = []
    for image, source in zip(images, sources):
        if tuple(image.shape[1:]) != size:
            raise PredictionError(
                f"{source}: image is {tuple(image.shape[1:])} pixels, the model takes {size}"
            )
        if image.shape[0] != channels:
            image = rgb_to_grayscale(image) if channels == 1 else image.expand(channels, -1, -1)
        ready.append(image)
    return (torch.stack(ready).float() / 255).numpy()


def predictions_table(logits: np.ndarray, inputs: Inputs, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per image: source, predicted index and class, confidence, true label when known."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "path": inputs.sources,
            "predicted_index": predicted,
            "predicted_class": [class_names[k] for k in predicted],
            "confidence": probabilities.max(axis=1),
            "true_label": inputs.labels,
        }
    )
    table["correct"] = (table["predicted_class"] == table["true_label"]).where(table["true_label"].notna())
    return table


def tally(table: pd.DataFrame) -> dict[str, int]:
    """Counts that add up across chunks: images, labelled images, correct predictions."""
    known = table["correct"].dropna()
    return {"images": len(table), "labelled": len(known), "correct": int(known.astype(bool).sum())}


def add_tallies(tallies: Sequence[dict[str, int]]) -> dict[str, int]:
    return {key: sum(t[key] for t in tallies) for key in ("images", "labelled", "correct")}


def predict_to_csv(
    model: Any, inputs: Inputs, registered: RegisteredModel, batch_size: int, output: Path
) -> dict[str, int]:
    """Predicts `inputs` a batch at a time, appending rows to `output` (complete, or not there)."""
    counts = []
    with atomic_output(output) as handle:
        handle.write(",".join(COLUMNS) + "\n")
        for start in range(0, len(inputs), batch_size):
            chunk = inputs.part(start, start + batch_size)
            pixels = to_pixels(chunk.images(), chunk.sources, registered.input_shape)
            table = predictions_table(model.predict(pixels), chunk, registered.class_names)
            table.to_csv(handle, header=False, index=False)
            counts.append(tally(table))
    return add_tallies(counts)


def merge_csvs(parts: Sequence[Path], output: Path) -> Path:
    """Concatenates part CSVs in order under one header."""
    with atomic_output(output) as merged:
        merged.write(",".join(COLUMNS) + "\n")
        for part in parts:
            with open(part, newline="") as handle:
                handle.readline()  # the part's header
                shutil.copyfileobj(handle, merged)
    return output
