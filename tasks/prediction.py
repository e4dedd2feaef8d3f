"""Batch prediction with a registered model: inputs to pixels, pixels to a predictions table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from torchvision.transforms.v2.functional import rgb_to_grayscale

from tasks.csv_images import IMAGE_SUFFIXES, Row, decode_rows, read_rows
from tasks.datasets import load_tensors, prepare_dataset
from tasks.tracking import get_client


class PredictionError(ValueError):
    """The model, alias or images asked for cannot be used."""


@dataclass
class Inputs:
    """Images to predict: uint8 (N, C, H, W), where each came from, and its label when known."""

    images: list[torch.Tensor]
    sources: list[str]
    labels: list[Optional[str]]


@dataclass
class RegisteredModel:
    model: Any  # an mlflow.pyfunc.PyFuncModel whose predict returns (N, classes) logits
    uri: str
    version: str
    source_run_id: str
    class_names: list[str]
    input_shape: tuple[int, int, int]


def load_registered(name: str, alias: str) -> RegisteredModel:
    """Loads `models:/name@alias`; a missing name or alias is a PredictionError saying what exists."""
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
    uri = f"models:/{name}@{alias}"
    model = mlflow.pyfunc.load_model(uri)
    shape = model.metadata.get_input_schema().inputs[0].shape
    return RegisteredModel(
        model=model,
        uri=uri,
        version=str(version.version),
        source_run_id=version.run_id,
        class_names=list(model.metadata.metadata["class_names"]),
        input_shape=tuple(shape[1:]),
    )


def csv_inputs(csv_path: Path, image_root: Path) -> Inputs:
    """Images named by a CSV (labels optional); a missing or broken image names its row."""
    rows = read_rows(csv_path, image_root, labels_required=False)
    return Inputs(
        decode_rows(rows, csv_path), [str(row.path) for row in rows], [row.label or None for row in rows]
    )


def folder_inputs(folder: Path) -> Inputs:
    """Every image file directly in `folder`, in name order."""
    if not folder.is_dir():
        raise PredictionError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PredictionError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    rows = [Row(index, path, "") for index, path in enumerate(paths, 1)]
    return Inputs(decode_rows(rows, folder), [str(p) for p in paths], [None] * len(paths))


def dataset_inputs(name: str, data_dir: Path, mirror: Optional[str] = None) -> Inputs:
    """The test split of a named dataset, labelled."""
    data = load_tensors(prepare_dataset(name, data_dir, mirror=mirror).tensors_path)
    labels = [data.class_names[k] for k in data.test_labels.tolist()]
    return Inputs(list(data.test_images), [f"{name}/test/{i}" for i in range(len(labels))], labels)


def to_pixels(inputs: Inputs, shape: tuple[int, int, int]) -> np.ndarray:
    """float32 pixels in [0, 1] shaped for the model; grey and RGB are converted as needed."""
    channels, size = shape[0], tuple(shape[1:])
    ready = []
    for image, source in zip(inputs.images, inputs.sources):
        if tuple(image.shape[1:]) != size:
            raise PredictionError(
                f"{source}: image is {tuple(image.shape[1:])} pixels, the model takes {size}"
            )
        if image.shape[0] != channels:
            image = rgb_to_grayscale(image) if channels == 1 else image.expand(channels, -1, -1)
        ready.append(image)
    return (torch.stack(ready).float() / 255).numpy()


def predict_logits(model: Any, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs the model over `pixels` in batches."""
    return np.concatenate(
        [model.predict(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def predictions_table(logits: np.ndarray, inputs: Inputs, class_names: list[str]) -> pd.DataFrame:
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
    known = table["true_label"].notna()
    unknown = set(table.loc[known, "true_label"]) - set(class_names)
    if unknown:
        raise PredictionError(f"labels {sorted(unknown)} are not among the model's classes {class_names}")
    table["correct"] = (table["predicted_class"] == table["true_label"]).where(known)
    return table


def accuracy(table: pd.DataFrame) -> Optional[float]:
    """Share of correct predictions among images with a known label; None when none is known."""
    known = table["correct"].dropna()
    return float(known.astype(bool).mean()) if len(known) else None
