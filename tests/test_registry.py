import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from models import ModelSpec, build_from_spec
from tasks import registry, tracking
from tasks.export import write_onnx
from tasks.registry import Candidate, decide_promotion

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


def test_both_flavors_register_and_predict_the_same_logits(mlflow_store, tmp_path):
    spec = ModelSpec("mlp", 1, (28, 28), 10)
    model = build_from_spec(spec).eval()
    onnx_path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    example = np.random.rand(4, 1, 28, 28).astype(np.float32)
    signature = registry.pixel_signature(example, 10)
    run_id = tracking.start_run("exp", "r", {})
    saved = {
        "m": registry.save_pytorch_flavor(model, example, signature, META, tmp_path / "pytorch-model"),
        "m-onnx": registry.save_onnx_flavor(onnx_path, example, signature, META, tmp_path / "onnx-model"),
    }
    assert registry.champion_tags("m") is None
    versions = {
        name: registry.register_version(run_id, path, name, {"test_accuracy": "0.5", "dataset_sha256": SHA})
        for name, path in saved.items()
    }
    assert registry.apply_decision(decide_promotion(Candidate(0.5, SHA, True), None), versions) == "champion"
    assert registry.champion_tags("m")["test_accuracy"] == "0.5"
    x = np.random.rand(7, 1, 28, 28).astype(np.float32)
    logits = [mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x) for name in saved]
    assert all(isinstance(out, np.ndarray) and out.shape == (7, 10) for out in logits)
    assert np.abs(logits[0] - logits[1]).max() < 1e-4
    assert np.abs(logits[0] - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-4
    assert mlflow.models.get_model_info("models:/m-onnx@champion").metadata["class_names"][9] == "9"
    # Registering the same run again (a retried task) returns the version it already has.
    assert registry.register_version(run_id, saved["m"], "m", {}) == "1"
    second_run = tracking.start_run("exp", "r2", {})
    again = {name: registry.register_version(second_run, path, name, {}) for name, path in saved.items()}
    registry.apply_decision(decide_promotion(Candidate(0.4, SHA, True), registry.champion_tags("m")), again)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("m-onnx", "challenger").version) == "2"
    assert "below" in client.get_model_version("m", "2").tags["promotion"]
