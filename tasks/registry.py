"""register_model: log both flavors, register them, and move `champion` only through the gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow.onnx
import mlflow.pytorch
import numpy as np
import onnx
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

import models.logits_pyfunc
from tasks.tracking import get_client, log_artifacts

CHAMPION, CHALLENGER = "champion", "challenger"
ONNX_SUFFIX = "-onnx"


@dataclass(frozen=True)
class Candidate:
    """What the gate knows about a freshly trained model."""

    test_accuracy: float
    dataset_sha256: str
    onnx_passed: bool


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide_promotion(candidate: Candidate, champion_tags: Optional[dict[str, str]]) -> Decision:
    """Champion moves only for a validated model at least as accurate on the same data."""
    if not candidate.onnx_passed:
        return Decision(False, "the ONNX parity check did not pass")
    if champion_tags is None:
        return Decision(True, "there is no champion yet")
    if champion_tags.get("dataset_sha256") != candidate.dataset_sha256:
        return Decision(
            False,
            "the champion was trained on different data "
            f"(dataset sha256 {champion_tags.get('dataset_sha256', 'unknown')[:12]}, this run "
            f"{candidate.dataset_sha256[:12]}); accuracies are not comparable, move the alias by hand",
        )
    best = float(champion_tags.get("test_accuracy", "nan"))
    if not candidate.test_accuracy >= best:
        return Decision(
            False, f"test accuracy {candidate.test_accuracy:.4f} is below the champion's {best:.4f}"
        )
    return Decision(True, f"test accuracy {candidate.test_accuracy:.4f} >= the champion's {best:.4f}")


def pixel_signature(example: np.ndarray, num_classes: int) -> ModelSignature:
    """float32 (-1, C, H, W) pixels in [0, 1] in, float32 (-1, classes) logits out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def save_pytorch_flavor(
    model: nn.Module, example: np.ndarray, signature: ModelSignature, metadata: dict, path: Path
) -> Path:
    """Saves the model as a torch.export program (no pickled classes to import on load)."""
    mlflow.pytorch.save_model(
        model.cpu().eval(),
        str(path),
        signature=signature,
        input_example=example,
        metadata=metadata,
        serialization_format="pt2",
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),  # inferring them costs seconds
    )
    return path


def save_onnx_flavor(
    onnx_path: Path, example: np.ndarray, signature: ModelSignature, metadata: dict, path: Path
) -> Path:
    """Saves the ONNX model with a pyfunc loader whose predict returns the logits array."""
    loader = Path(models.logits_pyfunc.__file__)
    mlflow.onnx.save_model(
        onnx.load(str(onnx_path)),
        str(path),
        signature=signature,
        input_example=example,
        metadata=metadata,
        code_paths=[str(loader)],
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    meta = Model.load(str(path / "MLmodel"))
    meta.flavors["python_function"]["loader_module"] = loader.stem
    meta.save(str(path / "MLmodel"))
    return path


def register_version(run_id: str, local_model: Path, name: str, tags: dict[str, str]) -> str:
    """Uploads a saved MLflow model into the run and registers it under `name`; returns the version.

    Idempotent, so a retried task never registers the same run twice.
    """
    client = get_client()
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return str(existing.version)
    log_artifacts(run_id, [local_model])
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{local_model.name}"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return str(version.version)


def champion_tags(name: str) -> Optional[dict[str, str]]:
    """Tags of the version `champion` points at, or None when there is none."""
    try:
        return dict(get_client().get_model_version_by_alias(name, CHAMPION).tags)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def apply_decision(decision: Decision, versions: dict[str, str]) -> str:
    """Points `champion` (or `challenger`) of every registered name at its new version."""
    client = get_client()
    alias = CHAMPION if decision.promote else CHALLENGER
    for name, version in versions.items():
        client.set_registered_model_alias(name, alias, version)
        client.set_model_version_tag(name, version, "promotion", decision.reason)
    return alias
