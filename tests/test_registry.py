import functools
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from models import ModelSpec, build_from_spec
from tasks.publish import registry
from tasks.publish.export import write_onnx
from tasks.publish.registry import Candidate, decide_promotion
from tasks.track import tracking

SHA = "a" * 64
META = {"class_names": [str(k) for k in range(10)], "dataset": "digits"}


@pytest.mark.parametrize(
    "candidate,champion,promote,why",
    [
        (Candidate(0.9, SHA, True), None, True, "no champion"),
        (Candidate(0.9, SHA, True), {"dataset_sha256": SHA, "test_accuracy": "0.9"}, True, ">="),
        (Candidate(0.8, SHA, True), {"dataset_sha256": SHA, "test_accuracy": "0.9"}, False, "below"),
        (Candidate(0.99, SHA, False), None, False, "ONNX"),
        (
            Candidate(0.99, SHA, True),
            {"dataset_sha256": "b" * 64, "test_accuracy": "0.5"},
            False,
            "different data",
        ),
    ],
)
def test_gate(candidate, champion, promote, why):
    decision = decide_promotion(candidate, champion)
    assert decision.promote is promote and why in decision.reason


def log_both(model, onnx_path, run_id, names=("m", "m-onnx")):
    example = np.random.rand(4, 1, 28, 28).astype(np.float32)
    options = dict(signature=registry.pixel_signature(example, 10), input_example=example, metadata=META)
    savers = [
        functools.partial(registry.save_pytorch, model, **options),
        functools.partial(registry.save_onnx_logits, onnx_path, **options),
    ]
    return {name: registry.log_model_once(run_id, name, {}, save) for name, save in zip(names, savers)}


def test_both_flavors_log_register_and_predict_the_same_logits(mlflow_store, tmp_path):
    spec = ModelSpec("mlp", 1, (28, 28), 10)
    model = build_from_spec(spec).eval()
    onnx_path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    run_id = tracking.start_run("exp", "r", {})
    tracking.log_params(run_id, {"lr": 0.5})
    model_ids = log_both(model, onnx_path, run_id)
    client = MlflowClient()
    for name, model_id in model_ids.items():
        logged = client.get_logged_model(model_id)
        assert (logged.name, logged.source_run_id, logged.params) == (name, run_id, {"lr": "0.5"})
        assert mlflow.models.get_model_info(f"models:/{model_id}").model_id == model_id
    outputs = client.get_run(run_id).outputs.model_outputs
    assert sorted(output.model_id for output in outputs) == sorted(model_ids.values())
    # A retried step finds the models it logged instead of logging them again.
    assert log_both(model, onnx_path, run_id) == model_ids
    assert registry.champion_tags("m") is None
    tags = {"test_accuracy": "0.5", "dataset_sha256": SHA}
    versions = {
        name: registry.register_version(run_id, model_id, name, tags, f"card of {name}", "contract")
        for name, model_id in model_ids.items()
    }
    assert registry.apply_decision(decide_promotion(Candidate(0.5, SHA, True), None), versions) == "champion"
    assert registry.champion_tags("m")["test_accuracy"] == "0.5"
    version = client.get_model_version("m-onnx", "1")
    assert (version.source, version.description) == (f"models:/{model_ids['m-onnx']}", "card of m-onnx")
    assert client.get_registered_model("m").description == "contract"
    linked = json.loads(client.get_logged_model(model_ids["m"]).tags["mlflow.modelVersions"])
    assert linked == [{"name": "m", "version": "1"}]
    x = np.random.rand(7, 1, 28, 28).astype(np.float32)
    logits = [mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x) for name in model_ids]
    assert all(isinstance(out, np.ndarray) and out.shape == (7, 10) for out in logits)
    assert np.abs(logits[0] - logits[1]).max() < 1e-4
    assert np.abs(logits[0] - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-4
    assert mlflow.models.get_model_info("models:/m-onnx@champion").metadata["class_names"][9] == "9"
    # Registering the same run again (a retried task) returns the version it already has.
    assert registry.register_version(run_id, model_ids["m"], "m", {}, "card", "contract") == "1"
    second_run = tracking.start_run("exp", "r2", {})
    again = {
        name: registry.register_version(second_run, model_id, name, {}, "card", "contract")
        for name, model_id in log_both(model, onnx_path, second_run).items()
    }
    registry.apply_decision(decide_promotion(Candidate(0.4, SHA, True), registry.champion_tags("m")), again)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("m-onnx", "challenger").version) == "2"
    assert "below" in client.get_model_version("m", "2").tags["promotion"]


def test_a_half_logged_model_is_replaced(mlflow_store, tmp_path):
    model = build_from_spec(ModelSpec("mlp", 1, (28, 28), 10)).eval()
    onnx_path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    run_id = tracking.start_run("exp", "r", {})
    experiment = MlflowClient().get_run(run_id).info.experiment_id

    def dies(**_):
        raise OSError("disk full")

    with pytest.raises(OSError):
        registry.log_model_once(run_id, "m", {}, dies)
    [dead] = MlflowClient().search_logged_models([experiment])
    assert dead.status != LoggedModelStatus.READY
    model_ids = log_both(model, onnx_path, run_id)
    remaining = MlflowClient().search_logged_models([experiment])
    assert sorted(m.model_id for m in remaining) == sorted(model_ids.values())


def test_saving_both_flavors_checks_requirements_without_scanning_every_package(
    tmp_path, monkeypatch, caplog
):
    from mlflow.utils import requirements_utils

    def scan():
        raise AssertionError("MLflow scanned every installed package")

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", scan)
    model = build_from_spec(ModelSpec("mlp", 1, (28, 28), 10)).eval()
    onnx_path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    example = np.random.rand(4, 1, 28, 28).astype(np.float32)
    options = dict(signature=registry.pixel_signature(example, 10), input_example=example)
    registry.save_pytorch(model, str(tmp_path / "pt"), mlflow.models.Model(), **options)
    registry.save_onnx_logits(onnx_path, str(tmp_path / "onnx"), mlflow.models.Model(), **options)
    assert (tmp_path / "pt" / "MLmodel").exists() and (tmp_path / "onnx" / "MLmodel").exists()
    assert "mismatches" not in caplog.text
    # The check itself still runs: a requirement this environment does not meet is named.
    requirements_utils.warn_dependency_requirement_mismatches(["torch==1.0.0"])
    assert "torch (current: " in caplog.text


def test_version_of_run_maps_a_run_to_its_version_of_any_name(mlflow_store):
    client = MlflowClient()
    runs = [tracking.start_run("exp", f"r{index}", {}) for index in range(2)]
    for name in ("it's", "it's-onnx"):
        client.create_registered_model(name)
        for run_id in reversed(runs):  # the second run registers first
            client.create_model_version(name, f"{mlflow_store}-source", run_id=run_id)
    assert registry.version_of_run("it's", runs[0]) == "2"
    assert registry.version_of_run("it's-onnx", runs[1]) == "1"
    assert registry.version_of_run("other", runs[0]) is None
    assert registry.champion_version("it's") is None
    client.set_registered_model_alias("it's", "champion", "2")
    assert registry.champion_version("it's").run_id == runs[0]
