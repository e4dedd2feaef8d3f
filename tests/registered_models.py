"""Models for the prediction tests: registry versions of this project's two flavors of a tiny MLP,
hostile ones whose loader writes a marker file as soon as MLflow's pyfunc machinery imports it, and
a stand-in that records the pixels it is given."""

from __future__ import annotations

import functools
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Optional

import mlflow.pyfunc
import numpy as np
import torch

from models import ModelSpec, build_from_spec
from tasks.publish import registry
from tasks.publish.export import write_onnx
from tasks.track import tracking

CLASSES = ["left", "right"]
PREP = {"channels": 1, "size": [12, 12], "resize_mode": "stretch"}
META = {"class_names": CLASSES, "preprocessing": PREP}
# Runs on import and on load: a marker file says MLflow ran code that came with the model.
HOSTILE_LOADER = """from pathlib import Path

Path({marker!r}).write_text("imported")


def _load_pyfunc(path):
    Path({marker!r}).write_text("loaded")
"""


def options(metadata: Optional[dict] = META) -> dict:
    """What the training flow saves with both flavors: signature, input example, metadata."""
    example = np.random.default_rng(0).random((2, 1, 12, 12), dtype=np.float32)
    signature = registry.pixel_signature(example, len(CLASSES))
    return dict(signature=signature, input_example=example, metadata=metadata)


def tiny_mlp() -> torch.nn.Module:
    return build_from_spec(ModelSpec("mlp", 1, (12, 12), len(CLASSES))).eval()


def register(name: str, save: Callable[..., None]) -> str:
    """Logs a model that `save(path=..., mlflow_model=...)` writes, in a run of its own, registers it
    under `name` and points `champion` at it; returns the version."""
    run_id = tracking.start_run("registered-models", name, {})
    model_id = registry.log_model_once(run_id, name, {}, save)
    version = registry.register_version(run_id, model_id, name, {}, "card", "contract")
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return version


def register_project_flavors(name: str, folder: Path, metadata: Optional[dict] = META) -> dict[str, str]:
    """Both flavors as training registers them: {registered name: version}."""
    model = tiny_mlp()
    onnx_path = write_onnx(model, torch.rand(2, 1, 12, 12), folder / f"{name}.onnx")
    return {
        name: register(name, functools.partial(registry.save_pytorch, model, **options(metadata))),
        name + "-onnx": register(
            name + "-onnx", functools.partial(registry.save_onnx_logits, onnx_path, **options(metadata))
        ),
    }


def hostile_loader(folder: Path, marker: Path) -> Path:
    """A pyfunc loader module (a file to ship as code) that writes `marker` when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    loader = folder / "hostile_loader.py"
    loader.write_text(HOSTILE_LOADER.format(marker=str(marker)))
    return loader


def save_hostile_pyfunc(loader: Path, path: str, mlflow_model: mlflow.models.Model) -> None:
    """A python_function-only model whose loader_module is `loader`, shipped in its code/: what
    `mlflow.pyfunc.load_model` imports and runs, with no pickle involved."""
    mlflow.pyfunc.save_model(
        path,
        loader_module=loader.stem,
        code_paths=[str(loader)],
        mlflow_model=mlflow_model,
        pip_requirements=[],  # inferring them would load the model, running the loader here
        **options(),
    )


def save_onnx_with_hostile_code(onnx_path: Path, loader: Path, path: str, mlflow_model) -> None:
    """This project's ONNX flavor, whose code/logits_pyfunc.py (what its pyfunc runs) is `loader`."""
    registry.save_onnx_logits(onnx_path, path, mlflow_model, **options())
    (Path(path) / "code" / "logits_pyfunc.py").write_text(loader.read_text())


class _Exec:
    """Unpickles as exec(code): what a pickle in a model file can do."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def save_pt2_with_hostile_pickle(marker: Path, path: str, mlflow_model: mlflow.models.Model) -> None:
    """This project's PyTorch flavor whose pt2 archive stores its first bias as a pickle that writes
    `marker` when unpickled, as torch.export.load does."""
    registry.save_pytorch(tiny_mlp(), path, mlflow_model, **options())
    archive = Path(path) / "data" / "model.pt2"
    with zipfile.ZipFile(archive) as source:
        records = {info.filename: source.read(info) for info in source.infolist()}
    [config_name] = [name for name in records if name.endswith("weights/model_weights_config.json")]
    config = json.loads(records[config_name])
    [entry] = [e for key, e in config["config"].items() if key.endswith("0.bias")]
    entry["use_pickle"] = True
    records[config_name] = json.dumps(config).encode()
    weight = config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]
    records[weight] = pickle.dumps(_Exec(f"open({str(marker)!r}, 'w').write('unpickled')"))
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in records.items():
            target.writestr(name, data)


class Recording:
    """A model that keeps the pixels it is given, and predicts class 0."""

    def __init__(self):
        self.pixels = []

    def predict(self, pixels):
        self.pixels.append(pixels)
        return np.zeros((len(pixels), 2), np.float32)
