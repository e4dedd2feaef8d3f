"""Batch prediction with a registered model, streamed: images are decoded, predicted and written
chunk by chunk, so memory does not grow with the number of images."""

from __future__ import annotations

import functools
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from common.files import atomic_output
from tasks.data.decoding import Preprocessing, preprocess
from tasks.predict import model_files, model_loading
from tasks.predict.image_inputs import Inputs, PredictionError
from tasks.predict.model_loading import LogitsModel
from tasks.track.tracking import get_client

COLUMNS = ["path", "predicted_index", "predicted_class", "confidence", "true_label", "correct"]


@dataclass(frozen=True)
class RegisteredModel:
    """A registry version pinned by number (an alias may move mid-run) and what predicting needs."""

    uri: str
    version: str
    source_run_id: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    preprocessing: Preprocessing  # how an image of any size becomes the model's input, as in training


def find_registered(
    name: str, alias: str, version: Optional[str] = None, numbered_by: str = ""
) -> RegisteredModel:
    """Resolves `models:/name@alias`, or the version that registered name `numbered_by` (the PyTorch
    flavor's) has as `version` when one is given: `name`'s version from the same training run. A
    missing name, alias or version is a PredictionError saying what exists."""
    client = get_client()
    try:
        if version is None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = _same_run_version(client, name, numbered_by or name, version)
    except MlflowException as error:
        try:
            aliases = sorted(client.get_registered_model(name).aliases)
        except MlflowException:
            raise PredictionError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}") from error
        wanted = f"no alias {alias!r}" if version is None else f"no version {version} of {numbered_by!r}"
        raise PredictionError(f"model {name!r} has {wanted} (aliases: {aliases or 'none'})") from error
    # Only the MLmodel is read here: a version this project did not write stops the flow before any
    # image is listed, and its model files are never downloaded.
    checked = model_files.read_checked(name, str(found.version))
    return RegisteredModel(
        uri=f"models:/{name}/{found.version}",
        version=str(found.version),
        source_run_id=found.run_id,
        class_names=checked.class_names,
        input_shape=checked.input_shape,
        preprocessing=checked.preprocessing,
    )


def _same_run_version(client: MlflowClient, name: str, numbered_by: str, version: str) -> ModelVersion:
    """`name`'s version registered by the run that registered `numbered_by` version `version`."""
    numbered = client.get_model_version(numbered_by, version)
    if name == numbered_by:
        return numbered
    found = client.search_model_versions(f"name = '{name}' and run_id = '{numbered.run_id}'")
    if not found:
        raise PredictionError(
            f"the run that registered {numbered_by!r} version {version} ({numbered.run_id}) registered no "
            f"version of {name!r}"
        )
    return found[0]


def load_logits_model(tracking_uri: str, model_uri: str) -> LogitsModel:
    """The model of `models:/NAME/VERSION`, checked again here (a worker may be handed any version)
    and loaded without MLflow's pyfunc loaders; its predict returns (N, classes) float32 logits.
    Loaded once per process and store, however many partitions ask for it at once."""
    with _LOADING:
        return _load_logits_model(tracking_uri, model_uri)


_LOADING = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_logits_model(tracking_uri: str, model_uri: str) -> LogitsModel:
    name, version = model_files.resolve(model_uri)
    return model_loading.load_logits(name, version)[1]


def to_pixels(images: Sequence[torch.Tensor], prep: Preprocessing) -> np.ndarray:
    """float32 pixels in [0, 1] shaped for the model: images not yet in `prep`'s shape (a dataset's
    test split) are preprocessed as training preprocessed its own."""
    return (torch.stack([preprocess(image, prep) for image in images]).float() / 255).numpy()


def predictions_table(
    logits: np.ndarray, sources: Sequence[str], labels: Sequence[Optional[str]], class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per image: source, predicted index and class, confidence, true label when known."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "path": sources,
            "predicted_index": predicted,
            "predicted_class": [class_names[k] for k in predicted],
            "confidence": probabilities.max(axis=1),
            "true_label": labels,
        }
    )
    table["correct"] = (table["predicted_class"] == table["true_label"]).where(table["true_label"].notna())
    return table


def tally(table: pd.DataFrame) -> dict:
    """Counts that add up across chunks: images, labelled images, correct predictions, and images
    per predicted class."""
    known = table["correct"].dropna()
    return {
        "images": len(table),
        "labelled": len(known),
        "correct": int(known.astype(bool).sum()),
        "classes": {str(name): int(n) for name, n in table["predicted_class"].value_counts().items()},
    }


def add_tallies(tallies: Sequence[dict]) -> dict:
    classes: Counter[str] = Counter()
    for part in tallies:
        classes.update(part["classes"])
    counts = {key: sum(t[key] for t in tallies) for key in ("images", "labelled", "correct")}
    return {**counts, "classes": dict(classes)}


def predict_to_csv(
    model: Any, inputs: Inputs, registered: RegisteredModel, batch_size: int, output: Path
) -> dict:
    """Predicts `inputs` a batch at a time, appending rows to `output` (complete, or not there)."""
    counts = []
    with atomic_output(output) as handle:
        handle.write(",".join(COLUMNS) + "\n")
        for sources, labels, images in inputs.batches(batch_size, registered.preprocessing):
            pixels = to_pixels(images, registered.preprocessing)
            table = predictions_table(model.predict(pixels), sources, labels, registered.class_names)
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
