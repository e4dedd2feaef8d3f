"""A registry version loaded as a logits model once its MLmodel passed `model_files`' checks, and
never through MLflow's pyfunc loaders: no code shipped with a model is imported, nothing unpickled."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import mlflow.pytorch
import numpy as np
import torch
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
from mlflow.exceptions import MlflowException

from models.logits_pyfunc import OnnxLogits
from tasks.predict import model_files
from tasks.predict.model_files import CheckedModel


class LogitsModel(Protocol):
    def predict(self, pixels: np.ndarray) -> np.ndarray: ...


class ExportedLogits:
    """A torch.export program's module: predict(pixels) gives (N, classes) float32 logits."""

    def __init__(self, module: torch.nn.Module) -> None:
        # The program was traced from a model in eval mode, which it keeps (its module refuses .eval()).
        self.module = module

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))).numpy()


def load_registered(model_uri: str) -> tuple[CheckedModel, LogitsModel]:
    """`load_logits` for `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    return load_logits(*model_files.resolve(model_uri))


def load_logits(name: str, version: str) -> tuple[CheckedModel, LogitsModel]:
    """Checks the version (`model_files.read_checked`), downloads it, checks the downloaded MLmodel
    and files again (the registry may have changed in between) and loads its model file directly:
    ONNX into an onnxruntime session, pt2 with torch.export through MLflow's pickle-free check."""
    checked = model_files.read_checked(name, version)
    with tempfile.TemporaryDirectory() as folder:
        uri = f"models:/{name}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        mlmodel = model_files.read_mlmodel(local / "MLmodel", name, version)
        if model_files.check_mlmodel(mlmodel, name, version) != checked:
            raise checked.refused("its MLmodel changed between the check and the download")
        files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
        model_files.check_listing(checked, files)
        if checked.flavor == "onnx":  # the session reads the file (and its external data) now
            return checked, OnnxLogits(str(local / checked.model_file))
        return checked, ExportedLogits(load_pt2(local, checked))


def load_pt2(folder: Path, checked: CheckedModel) -> torch.nn.Module:
    """The module of a checked PyTorch-flavor folder's torch.export program."""
    # torch.export.load unpickles the archive's weights with weights_only=False; MLflow first checks
    # that every record is plain data or a tensor, but only while its pickle deserialisation is off
    # (tasks/__init__.py turns it off in every process of the project).
    if MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
        why = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION is on, so its pt2 archive would not be checked for pickles"
        raise checked.refused(why)
    try:
        return mlflow.pytorch.load_model(str(folder))
    except MlflowException as error:
        first = error.message.split(". ")[0]  # the rest explains how to allow pickles
        raise checked.refused(f"its pt2 program cannot be loaded safely: {first}") from None
