import contextlib
import copy
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO
from registered_models import (
    hostile_loader,
    register,
    register_project_flavors,
    save_hostile_pyfunc,
    save_onnx_with_hostile_code,
    save_pt2_with_hostile_pickle,
    tiny_mlp,
)
from registered_models import options as model_options

from tasks.data.decoding import Preprocessing
from tasks.predict import model_files, model_loading, prediction
from tasks.predict.image_inputs import PredictionError
from tasks.predict.model_files import check_listing, check_mlmodel, main, resolve

SIGNATURE = {
    "inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 28, 28]}}]',
    "outputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3]}}]',
    "params": None,
}
METADATA = {
    "class_names": ["ant", "bee", "wasp"],
    "preprocessing": {"channels": 1, "resize_mode": "pad", "size": [28, 28]},
}
# The parts of the MLmodel files training writes that the checks read (MLflow 3.17's layout).
PYTORCH = {
    "flavors": {
        "python_function": {
            "config": {"device": None},
            "data": "data",
            "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
            "loader_module": "mlflow.pytorch",
            "pickle_module_name": "mlflow.pytorch.pickle_module",
            "python_version": "3.11.7",
        },
        "pytorch": {"code": None, "model_data": "data", "pytorch_version": "2.14.1+cu130"},
    },
    "metadata": METADATA,
    "signature": SIGNATURE,
}
ONNX = {
    "flavors": {
        "onnx": {
            "code": "code",
            "data": "model.onnx",
            "onnx_session_options": None,
            "onnx_version": "1.23.2",
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        },
        "python_function": {"code": "code", "data": "model.onnx", "loader_module": "logits_pyfunc"},
    },
    "metadata": METADATA,
    "signature": SIGNATURE,
}


def test_the_projects_two_flavors_pass():
    pytorch, onnx = (check_mlmodel(copy.deepcopy(m), "ants", "3") for m in (PYTORCH, ONNX))
    assert (pytorch.flavor, pytorch.model_file, onnx.flavor, onnx.model_file) == (
        "pytorch",
        "data/model.pt2",
        "onnx",
        "model.onnx",
    )
    for checked in (pytorch, onnx):
        assert checked.class_names == ("ant", "bee", "wasp") and checked.input_shape == (1, 28, 28)
        assert checked.preprocessing == Preprocessing(1, (28, 28), "pad")
    # Models logged before the preprocessing was recorded: a plain resize to their input.
    older = copy.deepcopy(ONNX)
    del older["metadata"]["preprocessing"]
    assert check_mlmodel(older, "ants", "1").preprocessing == Preprocessing(1, (28, 28), "stretch")
    check_listing(pytorch, ["MLmodel", "data", "data/model.pt2"])
    check_listing(onnx, ["MLmodel", "code", "model.onnx", "e5af.data"])


def edited(model: dict, path: str, value=...) -> dict:
    """A deep copy of `model` with the entry at `path` ('a/b/c') set to `value`, or deleted (...)."""
    model = copy.deepcopy(model)
    *parents, last = path.split("/")
    section = functools.reduce(lambda d, key: d[key], parents, model)
    if value is ...:
        del section[last]
    else:
        section[last] = value
    return model


HOSTILE_PYFUNC = {"python_function": {"loader_module": "hostile_loader", "code": "code"}}
REFUSED = {
    "python_function only": ({"flavors": HOSTILE_PYFUNC, "metadata": METADATA}, "python_function", "only"),
    "another flavor too": (
        edited(PYTORCH, "flavors/sklearn", {"pickled_model": "model.pkl"}),
        "python_function, pytorch, sklearn",
        "two flavors",
    ),
    "own pyfunc loader": (
        edited(PYTORCH, "flavors/python_function/loader_module", "hostile_loader"),
        "python_function, pytorch",
        "loader_module is 'hostile_loader', not 'mlflow.pytorch'",
    ),
    "code with the PyTorch flavor": (
        edited(PYTORCH, "flavors/pytorch/code", "code"),
        "python_function, pytorch",
        "pytorch flavor's code is 'code', not None",
    ),
    "another pickle module": (
        edited(PYTORCH, "flavors/python_function/pickle_module_name", "cloudpickle"),
        "python_function, pytorch",
        "pickle_module_name is 'cloudpickle'",
    ),
    "unknown field": (
        edited(PYTORCH, "flavors/pytorch/extra_files", [{"path": "x"}]),
        "python_function, pytorch",
        "fields this project does not write: extra_files",
    ),
    "ONNX file elsewhere": (
        edited(ONNX, "flavors/onnx/data", "../other/model.onnx"),
        "onnx, python_function",
        "data '../other/model.onnx' is not the name of a .onnx file",
    ),
    "no flavors": ({"metadata": METADATA}, "none", "names no flavors"),
    "not a mapping": (["flavors"], "none", "names no flavors"),
    "no class names": (
        edited(ONNX, "metadata/class_names"),
        "onnx, python_function",
        "metadata has no class_names",
    ),
    "no metadata": (edited(PYTORCH, "metadata"), "python_function, pytorch", "metadata has no class_names"),
    "class names not strings": (
        edited(ONNX, "metadata/class_names", [1, 2, 3]),
        "onnx, python_function",
        "class_names [1, 2, 3] is not a list of strings",
    ),
    "a class twice": (
        edited(ONNX, "metadata/class_names", ["a", "a", "b"]),
        "onnx, python_function",
        "repeat a name",
    ),
    "classes and outputs differ": (
        edited(ONNX, "metadata/class_names", ["a", "b"]),
        "onnx, python_function",
        "to (-1, 2) logits",
    ),
    "no signature": (edited(ONNX, "signature"), "onnx, python_function", "signature None is not"),
    "huge input": (
        edited(ONNX, "signature/inputs", SIGNATURE["inputs"].replace("28, 28", "28, 100000")),
        "onnx, python_function",
        "at most 4096 pixels a side",
    ),
    "bad preprocessing": (
        edited(ONNX, "metadata/preprocessing", {"channels": 2, "size": [28, 28]}),
        "onnx, python_function",
        "channels must be 1 or 3",
    ),
    "preprocessing not a mapping": (
        edited(ONNX, "metadata/preprocessing", "resize please"),
        "onnx, python_function",
        "preprocessing resize please is not valid",
    ),
    "preprocessing for another input": (
        edited(ONNX, "metadata/preprocessing/size", [32, 32]),
        "onnx, python_function",
        "does not give its input shape (1, 28, 28)",
    ),
}


@pytest.mark.parametrize("mlmodel,flavors,why", REFUSED.values(), ids=REFUSED.keys())
def test_anything_else_is_refused_naming_the_version_its_flavors_and_why(mlmodel, flavors, why):
    with pytest.raises(PredictionError) as raised:
        check_mlmodel(mlmodel, "ants", "7")
    assert f"model 'ants' version 7 (flavors: {flavors}) is refused: " in str(raised.value)
    assert why in str(raised.value)


def test_a_pickled_pytorch_model_is_refused_from_its_file_listing():
    checked = check_mlmodel(copy.deepcopy(PYTORCH), "ants", "2")
    pickled = ["MLmodel", "data/model.pth", "data/pickle_module_info.txt"]
    with pytest.raises(PredictionError, match=r"version 2 .*data/ holds data/model.pth, data/pickle_mod"):
        check_listing(checked, pickled)
    with pytest.raises(PredictionError, match="version 4 .*it has no file model.onnx"):
        check_listing(check_mlmodel(copy.deepcopy(ONNX), "ants", "4"), ["MLmodel"])


@pytest.mark.parametrize("uri", ["runs:/abc/model", "models:/ants", "/tmp/model", "models:/m-0123abc"])
def test_only_registry_uris_are_resolved(uri):
    with pytest.raises(PredictionError, match="is not a models:/NAME@ALIAS or models:/NAME/VERSION URI"):
        resolve(uri)
    assert resolve("models:/ants-onnx/12") == ("ants-onnx", "12")


@pytest.mark.slow
def test_every_process_of_the_project_has_mlflows_pickle_loading_off():
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    code = "import os, tasks; print(os.environ['MLFLOW_ALLOW_PICKLE_DESERIALIZATION'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "false", done.stderr


@dataclass
class Store:
    uri: str
    folder: Path
    marker: Path  # written by every hostile model's code, if it ever runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One registry: 'shapes' and 'shapes-onnx' as training registers them (version 1), then a
    python_function model whose loader writes a marker registered under both (version 2, now
    `champion`), and hostile variants of each flavor."""
    folder = tmp_path_factory.mktemp("registry")
    uri, marker = f"sqlite:///{folder / 'mlflow.db'}", folder / "marker"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)  # the artefacts' ./mlruns
        register_project_flavors("shapes", folder)
        loader = hostile_loader(folder / "code", marker)
        for name in ("shapes", "shapes-onnx"):
            assert register(name, functools.partial(save_hostile_pyfunc, loader)) == "2"
        onnx_path = folder / "shapes.onnx"
        register("sneaky-onnx", functools.partial(save_onnx_with_hostile_code, onnx_path, loader))
        register("crafted", functools.partial(save_pt2_with_hostile_pickle, marker))
        pickled = functools.partial(
            mlflow.pytorch.save_model, tiny_mlp(), serialization_format="pickle", pip_requirements=[]
        )
        register("pickled", functools.partial(pickled, **model_options()))
        register_project_flavors("nameless", folder, metadata={})
    assert not marker.exists()
    return Store(uri, folder, marker)


@pytest.fixture
def registry(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    yield store
    ran = store.marker.exists()
    store.marker.unlink(missing_ok=True)  # one failure, not one for every test after it
    assert not ran, "a hostile model's code ran"


def test_both_flavors_load_without_pyfunc_and_agree(registry):
    pixels = np.random.default_rng(1).random((5, 1, 12, 12), dtype=np.float32)
    logits = {}
    for name in ("shapes", "shapes-onnx"):
        checked, model = model_loading.load_logits(name, "1")
        assert checked.class_names == ("left", "right") and checked.preprocessing.size == (12, 12)
        logits[name] = model.predict(pixels)
        assert logits[name].dtype == np.float32 and logits[name].shape == (5, 2)
    assert np.abs(logits["shapes"] - logits["shapes-onnx"]).max() < 1e-4


def downloads(monkeypatch) -> list[str]:
    """Records every artefact download MLflow is asked for."""
    asked, download = [], mlflow.artifacts.download_artifacts

    def recording(artifact_uri=None, **kwargs):
        asked.append(artifact_uri)
        return download(artifact_uri=artifact_uri, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", recording)
    return asked


@pytest.mark.parametrize("name", ["shapes", "shapes-onnx"])
def test_a_hostile_champion_is_refused_from_its_mlmodel_alone(registry, monkeypatch, name):
    asked = downloads(monkeypatch)
    message = f"model '{name}' version 2 (flavors: python_function) is refused: only this project's"
    with pytest.raises(PredictionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prediction.find_registered(name, "champion")
    # A worker handed the version anyway checks it again before loading anything.
    with pytest.raises(PredictionError, match=f"'{name}' version 2"):
        prediction.load_logits_model(registry.uri, f"models:/{name}/2")
    assert asked == [f"models:/{name}/2/MLmodel"] * 2


def test_the_hostile_models_are_real(registry, tmp_path, monkeypatch):
    """What the other tests refuse runs its code through MLflow's own loaders."""
    monkeypatch.chdir(tmp_path)
    with contextlib.suppress(Exception):
        mlflow.pyfunc.load_model("models:/shapes/2")
    assert registry.marker.read_text() == "loaded"
    registry.marker.unlink()
    folder = mlflow.artifacts.download_artifacts("models:/crafted/1", dst_path=str(tmp_path))
    with contextlib.suppress(Exception):
        torch.export.load(Path(folder) / "data" / "model.pt2")
    assert registry.marker.read_text() == "unpickled"
    registry.marker.unlink()


def test_an_onnx_models_shipped_code_is_never_run_and_fails_the_serving_check(registry, capsys):
    checked, model = model_loading.load_logits("sneaky-onnx", "1")
    assert model.predict(np.zeros((2, 1, 12, 12), np.float32)).shape == (2, 2)
    with pytest.raises(SystemExit, match="version 1 .* the code its pyfunc runs when served is not this"):
        main(["check", "models:/sneaky-onnx@champion"])
    assert main(["check", "models:/shapes-onnx/1"]) == "models:/shapes-onnx/1"
    assert capsys.readouterr().out == "models:/shapes-onnx/1\n"
    with pytest.raises(SystemExit, match="'shapes' version 2 \\(flavors: python_function\\) is refused"):
        main(["check", "models:/shapes@champion"])


def test_a_pt2_archive_with_a_pickle_in_it_is_refused(registry):
    with pytest.raises(PredictionError, match="'crafted' version 1 .*weight_1' in the model's 'pt2' archive"):
        model_loading.load_logits("crafted", "1")


def test_pt2_is_not_loaded_while_mlflow_would_unpickle(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(
        PredictionError, match="'shapes' version 1 .*MLFLOW_ALLOW_PICKLE_DESERIALIZATION is on"
    ):
        model_loading.load_logits("shapes", "1")


def test_a_pickled_pytorch_model_is_refused_before_download(registry, monkeypatch):
    asked = downloads(monkeypatch)
    with pytest.raises(PredictionError, match="'pickled' version 1 .*data/ holds data/model.pth"):
        model_loading.load_logits("pickled", "1")
    assert asked == ["models:/pickled/1/MLmodel"]


@pytest.mark.parametrize("name", ["nameless", "nameless-onnx"])
def test_a_model_without_class_names_names_what_is_missing(registry, name):
    with pytest.raises(PredictionError, match=f"'{name}' version 1 .*metadata has no class_names"):
        prediction.find_registered(name, "champion")


def test_an_mlmodel_that_is_not_yaml_is_refused(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: [unclosed")
    with pytest.raises(PredictionError, match="'ants' version 5 .*its MLmodel is not YAML"):
        model_files.read_mlmodel(tmp_path / "MLmodel", "ants", "5")
    (tmp_path / "MLmodel").write_text("!!python/object/apply:os.system ['true']")
    with pytest.raises(PredictionError, match="not YAML"):  # safe_load builds no objects from tags
        model_files.read_mlmodel(tmp_path / "MLmodel", "ants", "5")
