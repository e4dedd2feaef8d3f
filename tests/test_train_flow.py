"""End-to-end: the whole flow on offline data against a real SQLite MLflow store and a Prefect server."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import mlflow
import pytest
import torch
from conftest import EPOCH_METRICS, TRAIN_SCRIPT, prefect_artifacts
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from flows.cli import parse_config
from flows.config import TrainConfig
from flows.train_flow import main, train_flow
from tasks.data.mnist_files import DownloadError
from tasks.publish import export, registry
from tasks.publish import steps as publish_steps
from tasks.train import speed, training
from tasks.train import steps as train_steps

pytestmark = pytest.mark.slow
ARTEFACTS = {
    "model_weights.pth",
    "model.onnx",
    "confusion_matrix.png",
    "learning_curves.png",
    "misclassified.png",
    "per_class_metrics.csv",
    "test_logits.npy",
    "config.json",
}


def readme_snippet() -> str:
    """docs/serving.md's 'In Python' block, exactly as users will copy it."""
    page = (TRAIN_SCRIPT.parents[1] / "docs" / "serving.md").read_text()
    section = page.split("## In Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def config(tmp_path: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "outputs"), experiment="e2e", **overrides
    )


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    """The smallest real run, for what holds at any size (retries, gates, failures): the MLP on
    scikit-learn's digits at their own 8x8 pixels (about 1,300 training images, a tenth of a second
    an epoch)."""
    return config(tmp_path, **{"dataset": "digits", "model": "mlp", "image_size": "8", **overrides})


def no_retry_delay(monkeypatch, *tasks) -> None:
    """The tasks retry at once: the wait before a retry is no part of what these tests check."""
    for task in tasks:
        monkeypatch.setattr(task, "retry_delay_seconds", 0)


def alias_version(name: str, alias: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def test_digits_runs_log_everything_and_champion_moves_only_when_better(
    prefect_server, mlflow_store, tmp_path
):
    weak = config(tmp_path, dataset="digits", model="mlp", epochs=1, lr=1e-5, registered_model="digits-cnn")
    first = train_flow(weak)
    assert first["alias"] == "champion"

    strong = train_flow(config(tmp_path, dataset="digits", epochs=3))
    assert strong["test_accuracy"] >= 0.95 > first["test_accuracy"]
    assert strong["alias"] == "champion" and alias_version("digits-cnn", "champion") == "2"
    assert alias_version("digits-cnn-onnx", "champion") == "2"

    run = MlflowClient().get_run(strong["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert set(run.data.params) == {*TrainConfig.model_fields, "world_size", "batch_per_process"}
    assert run.data.params["world_size"] == "1" and "backend" not in run.data.tags
    client = MlflowClient()
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    for name in ("test_accuracy", "test_loss", "onnx_max_abs_diff", "onnx_top1_agreement", "test_f1_7_7"):
        assert name in run.data.metrics
    assert run.data.metrics["onnx_top1_agreement"] == 1.0 and run.data.metrics["onnx_max_abs_diff"] <= 1e-4
    tags = run.data.tags
    assert tags["dataset"] == "digits" and len(tags["dataset_sha256"]) == 64 and tags["device"] == "cpu"
    assert tags["prefect.flow_run_id"] and tags["prefect.flow_run_name"] and tags["torch_version"]
    native_bf16 = speed.cpu_has_native_bf16()
    assert (tags["precision"], tags["channels_last"], tags["compile"]) == (
        "bf16" if native_bf16 else "fp32",
        "true",
        "false",
    )
    assert tags["threads"] == str(speed.physical_cores()) and run.data.params["precision"] == "auto"
    assert ARTEFACTS <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (
        Path(strong["run_dir"]).parent == tmp_path / "outputs"
        and Path(strong["run_dir"], "model.onnx").exists()
    )
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    check_logged_and_registered(run, strong)
    check_dataset_inputs(run)
    check_prefect_artifacts(tags["prefect.flow_run_id"], "digits-cnn")

    # Users run the docs' snippet in a fresh process: both flavors agree on plain [0, 1] pixels.
    fresh = subprocess.run(
        [sys.executable, "-c", readme_snippet()], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    shape_line, diff_line = fresh.stdout.strip().splitlines()[-2:]
    assert shape_line.startswith("(4, 10)") and float(diff_line) <= 1e-4

    again = train_flow(weak)
    assert again["alias"] == "challenger" and "below the champion" in again["reason"]
    assert alias_version("digits-cnn", "champion") == "2" and alias_version("digits-cnn", "challenger") == "3"


def check_logged_and_registered(run, result: dict) -> None:
    """Both flavors are logged models of the run with test metrics, registered from models:/<id>
    with a model card; the registered models describe their contract."""
    client = MlflowClient()
    logged = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert {model.name: model.model_id for model in logged} == result["model_ids"]
    sha = run.data.tags["dataset_sha256"]
    for model in logged:
        metrics = {metric.key: metric.value for metric in model.metrics}
        assert metrics["test_accuracy"] == result["test_accuracy"] and "test_f1_7_7" in metrics
        assert model.params["epochs"] == "3" and model.status == LoggedModelStatus.READY
        version = client.get_model_version(model.name, result["versions"][model.name])
        assert version.source == f"models:/{model.model_id}" and version.run_id == run.info.run_id
        assert mlflow.models.get_model_info(f"models:/{model.name}@champion").model_id == model.model_id
        card = version.description
        assert f"{result['test_accuracy']:.4f}" in card and sha[:12] in card
        assert "| 7 |" in card and "champion: test accuracy" in card and run.info.run_id in card
        contract = client.get_registered_model(model.name).description
        assert "(N, 1, 28, 28)" in contract and "(N, 10)" in contract and "0, 1, 2" in contract


def check_dataset_inputs(run) -> None:
    inputs = {
        tag.value: entry.dataset
        for entry in run.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    assert set(inputs) == {"training", "validation", "test"}
    sha = run.data.tags["dataset_sha256"]
    assert inputs["test"].digest == sha[:16] and inputs["training"].digest.startswith(sha[:16])
    assert json.loads(inputs["test"].profile)["num_rows"] == int(run.data.tags["dataset_test_size"])
    assert json.loads(inputs["training"].source) == {
        "tags": {"generator": "tasks.data.offline_data.load_digits"}
    }


def check_prefect_artifacts(flow_run_id: str, name: str) -> None:
    artifacts = {a.key: a for a in prefect_artifacts(flow_run_id=flow_run_id)}
    assert artifacts[f"{name}-summary"].type == "markdown"
    assert "test accuracy" in artifacts[f"{name}-summary"].data
    assert artifacts[f"{name}-per-class"].type == "table"
    assert artifacts[f"{name}-training"].type == "progress"
    assert float(artifacts[f"{name}-training"].data) == 100.0


def test_csv_dataset_trains_end_to_end(prefect_server, mlflow_store, png_dataset, tmp_path):
    result = train_flow(
        config(
            tmp_path,
            dataset="csv",
            model="mlp",
            epochs=2,
            batch_size=8,
            system_metrics=False,
            **{key: str(value) for key, value in png_dataset.items()},
        )
    )
    assert result["versions"] == {"csv-mlp": "1", "csv-mlp-onnx": "1"}
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert not [key for key in run.data.metrics if key.startswith("system/")]
    sources = {json.loads(entry.dataset.source)["uri"] for entry in run.inputs.dataset_inputs}
    assert sources == {str(png_dataset["train_csv"]), str(png_dataset["test_csv"])}
    table = Path(result["run_dir"], "per_class_metrics.csv").read_text()
    assert "left" in table and "right" in table


def test_onnx_mismatch_fails_the_run_and_registers_nothing(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    monkeypatch.setattr(export, "MAX_ABS_DIFF", -1.0)  # any difference at all now counts as a mismatch
    with pytest.raises(export.OnnxMismatchError, match="nothing will be registered"):
        train_flow(tiny(tmp_path, epochs=1))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_registered_models() == []


def test_unreachable_download_fails_within_seconds(prefect_server, mlflow_store, tmp_path):
    started = time.monotonic()
    with pytest.raises(DownloadError, match="could not download .*--dataset synthetic or --dataset digits"):
        train_flow(config(tmp_path, dataset="fashion-mnist", mirror="http://127.0.0.1:9/"))
    assert time.monotonic() - started < 30


def test_without_imagenet_weights_offline_the_command_line_stops_before_any_server_or_data_work(
    tmp_path, monkeypatch
):
    """Issue 16: --weights imagenet with an empty torch cache and no network names the file and the
    folder it belongs in, within 30 s, before anything is listed, prepared or started. The command
    line's `main` runs in this process, with the servers' checks and the flow made to fail if reached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MODELS_WEIGHTS_BASE_URL", "http://127.0.0.1:9/models")  # nothing listens on 9
    monkeypatch.chdir(tmp_path)
    for step in ("prepare_servers", "train_flow"):
        monkeypatch.setattr(f"flows.train_flow.{step}", reached(step))
    started = time.monotonic()
    flags = ["--dataset", "folder", "--train-dir", "photos", "--model", "resnet18", "--weights", "imagenet"]
    with pytest.raises(SystemExit) as exited:
        main(parse_config(flags))
    assert time.monotonic() - started < 30
    message = str(exited.value.code)
    assert message.startswith("error: ImageNet weights for resnet18")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in message and str(folder) in message
    assert not (tmp_path / "data").exists()


def reached(step: str) -> Callable[..., None]:
    """A stand-in for `step` that fails the test if the run gets that far."""

    def fail(*args, **kwargs) -> None:
        raise AssertionError(f"{step} was reached")

    return fail


def fail_once_at_call(monkeypatch, failing_call: int) -> list[int]:
    """Makes the `failing_call`-th epoch of training raise, once; returns the epoch-call log."""
    real = training.train_one_epoch
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == failing_call:
            raise RuntimeError("simulated crash at the start of an epoch")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", flaky)
    return calls


def test_flow_retry_resumes_training_in_the_same_mlflow_run(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    settings = dict(epochs=4, registered_model="resume")
    straight = train_flow(tiny(tmp_path / "a", **settings))

    calls = fail_once_at_call(monkeypatch, failing_call=3)
    retried = train_flow.with_options(retries=1, retry_delay_seconds=0)(
        tiny(tmp_path / "b", train_retries=0, **settings)
    )
    assert len(calls) == 5  # epochs 1, 2, then 3 fails; the retry runs only 3 and 4

    client = MlflowClient()
    run = client.get_run(retried["mlflow_run_id"])
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    same_flow_run = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(same_flow_run) == 1 and run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3, 4], name

    weights = [
        torch.load(Path(r["run_dir"], "model_weights.pth"), weights_only=True) for r in (straight, retried)
    ]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_train_task_retry_resumes_from_its_checkpoint(prefect_server, mlflow_store, tmp_path, monkeypatch):
    calls = fail_once_at_call(monkeypatch, failing_call=2)
    no_retry_delay(monkeypatch, train_steps.train_model)
    result = train_flow(tiny(tmp_path, epochs=3))
    assert len(calls) == 4 and result["alias"] == "champion"
    history = MlflowClient().get_metric_history(result["mlflow_run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]


def test_retried_registration_logs_each_flavor_once(prefect_server, mlflow_store, tmp_path, monkeypatch):
    real, calls = registry.register_version, []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the ONNX flavor, after the PyTorch flavor registered
            raise ConnectionError("simulated registry outage")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "register_version", flaky)
    no_retry_delay(monkeypatch, publish_steps.register_model)
    result = train_flow(tiny(tmp_path, epochs=1))
    assert len(calls) == 4 and result["versions"] == {"digits-mlp": "1", "digits-mlp-onnx": "1"}
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    logged = client.search_logged_models([run.info.experiment_id])
    assert sorted(model.name for model in logged) == ["digits-mlp", "digits-mlp-onnx"]
    assert len(run.outputs.model_outputs) == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [0]


def test_train_timeout_fails_the_run(prefect_server, mlflow_store, tmp_path):
    with pytest.raises(TimeoutError):
        train_flow(
            config(tmp_path, dataset="digits", epochs=1000, train_retries=0, train_timeout_minutes=0.05)
        )
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FAILED" and client.search_registered_models() == []
