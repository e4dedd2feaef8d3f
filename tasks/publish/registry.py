"""register_model: log both flavors as MLflow logged models, register them with a model card, and
move `champion` only through the gate."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlflow.onnx
import mlflow.pytorch
import numpy as np
import onnx
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

import models.logits_pyfunc
from common import compat
from tasks.track.tracking import get_client, skip_package_scan

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


Save = Callable[..., None]  # save(path=..., mlflow_model=...) writes an MLflow model folder


def save_pytorch(model: nn.Module, path: str, mlflow_model: Model, **options) -> None:
    """Saves a torch.export program (no pickled classes to import on load)."""
    skip_package_scan()
    mlflow.pytorch.save_model(
        model.cpu().eval(),
        path,
        mlflow_model=mlflow_model,
        serialization_format="pt2",
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),  # inferring them costs seconds
        **options,
    )


_SET_BY_ADD_TO_MODEL = ("loader_module", "python_version")  # mlflow.pyfunc.add_to_model's own fields


def save_onnx_logits(onnx_path: Path, path: str, mlflow_model: Model, **options) -> None:
    """Saves the ONNX flavor with models/logits_pyfunc.py as its pyfunc loader."""
    # MLflow's own ONNX pyfunc answers a numpy batch with {output name: array} where the PyTorch
    # flavor answers with the array itself, so batch and served predictions would change shape with
    # the flavor; the loader makes both return the (N, classes) logits array.
    loader = Path(models.logits_pyfunc.__file__)
    skip_package_scan()
    mlflow.onnx.save_model(
        onnx.load(str(onnx_path)),
        path,
        mlflow_model=mlflow_model,
        code_paths=[str(loader)],
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        **options,
    )
    # The pyfunc flavor again, with the loader instead of mlflow.onnx, through MLflow's public way to
    # say how a saved folder loads as pyfunc; the rest (data, code, env) stays as saved.
    from mlflow.pyfunc import FLAVOR_NAME, add_to_model

    saved = mlflow_model.flavors[FLAVOR_NAME].items()
    add_to_model(mlflow_model, loader.stem, **{k: v for k, v in saved if k not in _SET_BY_ADD_TO_MODEL})
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_model_once(run_id: str, name: str, tags: dict[str, str], save: Save) -> str:
    """Id of the run's logged model `name`: the one an earlier attempt completed, else a new one,
    with the run's params, that `save` fills; it is recorded as an output of the run."""
    client = get_client()
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    for model in found:
        if model.status == LoggedModelStatus.READY:
            return model.model_id
        client.delete_logged_model(model.model_id)  # left half-logged by an attempt that died
    model = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, params=run.data.params, tags=tags
    )
    meta = Model(
        artifact_path=model.artifact_location,
        model_uuid=model.model_id,
        run_id=run_id,
        model_id=model.model_id,
    )
    with tempfile.TemporaryDirectory() as folder:
        save(path=f"{folder}/model", mlflow_model=meta)
        client.log_model_artifacts(model.model_id, f"{folder}/model")
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=0)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def register_version(
    run_id: str, model_id: str, name: str, tags: dict[str, str], card: str, contract: str
) -> str:
    """Registers logged model `model_id` under `name` with `card` as its description, and `contract`
    as the registered model's; returns the version. Idempotent: a retry finds its version again."""
    client = get_client()
    try:
        client.create_registered_model(name, description=contract)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_registered_model(name, description=contract)
    version = version_of_run(name, run_id)
    if version is None:
        created = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=tags, description=card, model_id=model_id
        )
        version = str(created.version)
    # The link from the logged model to its versions, as mlflow.register_model records it (the UI
    # lists a logged model's versions from it); create_model_version leaves it to a tracking server.
    link = json.dumps([{"name": name, "version": version}])
    client.set_logged_model_tags(model_id, {compat.reserved_tag(compat.MODEL_VERSIONS_TAG): link})
    return version


def version_of_run(name: str, run_id: str) -> Optional[str]:
    """The version of `name` that MLflow run `run_id` registered, or None."""
    # By run id alone (hex, safe in a filter) and the name compared here: a name may hold quotes.
    found = get_client().search_model_versions(f"run_id = '{run_id}'")
    versions = [int(version.version) for version in found if version.name == name]
    return str(min(versions)) if versions else None


def champion_version(name: str) -> Optional[ModelVersion]:
    """The version `champion` of `name` points at, or None when there is none."""
    try:
        return get_client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion_tags(name: str) -> Optional[dict[str, str]]:
    """Tags of the version `champion` points at, or None when there is none."""
    champion = champion_version(name)
    return None if champion is None else dict(champion.tags)


def apply_decision(decision: Decision, versions: dict[str, str]) -> str:
    """Points `champion` (or `challenger`) of every registered name at its new version."""
    client = get_client()
    alias = CHAMPION if decision.promote else CHALLENGER
    for name, version in versions.items():
        client.set_registered_model_alias(name, alias, version)
        client.set_model_version_tag(name, version, "promotion", decision.reason)
    return alias
