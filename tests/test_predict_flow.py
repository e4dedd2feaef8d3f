"""End-to-end: predictions from a registry that a real training run filled."""

import pandas as pd
import pytest
from conftest import REPO, run_train_script
from mlflow import MlflowClient

from flows.config import PredictConfig, TrainConfig
from flows.predict_flow import predict_flow
from flows.train_flow import train_flow
from tasks.prediction import PredictionError

pytestmark = pytest.mark.slow


@pytest.fixture
def trained_csv_model(prefect_server, mlflow_store, png_dataset, tmp_path):
    """A cnn trained on the PNG dataset, registered as 'shapes' (and 'shapes-onnx')."""
    config = TrainConfig(
        dataset="csv",
        model="cnn",
        epochs=3,
        batch_size=8,
        registered_model="shapes",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "outputs"),
        **{key: str(value) for key, value in png_dataset.items()},
    )
    return train_flow(config)


def test_script_predicts_a_csv_with_the_training_runs_accuracy(trained_csv_model, png_dataset, tmp_path):
    output = tmp_path / "predictions.csv"
    result = run_train_script(
        tmp_path,
        "--registered-model",
        "shapes",
        "--input-csv",
        str(png_dataset["test_csv"]),
        "--image-root",
        str(png_dataset["image_root"]),
        "--output",
        str(output),
        script=REPO / "flows" / "predict_flow.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(output)
    assert list(table.columns) == [
        "path",
        "predicted_index",
        "predicted_class",
        "confidence",
        "true_label",
        "correct",
    ]
    assert len(table) == 12 and set(table["predicted_class"]) <= {"left", "right"}
    assert table["correct"].mean() == pytest.approx(trained_csv_model["test_accuracy"])
    assert f"accuracy {trained_csv_model['test_accuracy']:.4f}" in result.stdout + result.stderr

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("image-classifier-predictions").experiment_id])
    assert run.data.tags["model_uri"] == "models:/shapes-onnx@champion"
    assert run.data.tags["model_version"] == "1"
    assert run.data.tags["model_source_run_id"] == trained_csv_model["mlflow_run_id"]
    assert run.data.metrics["accuracy"] == pytest.approx(trained_csv_model["test_accuracy"])
    assert "predictions.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_pytorch_flavor_on_a_folder_agrees_with_onnx(trained_csv_model, png_dataset, tmp_path):
    folder = str(png_dataset["image_root"] / "img")
    results = [
        predict_flow(
            PredictConfig(
                registered_model="shapes",
                flavor=flavor,
                image_dir=folder,
                output=str(tmp_path / f"{flavor}.csv"),
                output_dir=str(tmp_path / "out"),
            )
        )
        for flavor in ("onnx", "pytorch")
    ]
    onnx, pytorch = (pd.read_csv(r["predictions"]) for r in results)
    assert len(onnx) == 48 and onnx["true_label"].isna().all() and "accuracy" not in results[0]
    assert onnx["predicted_index"].tolist() == pytorch["predicted_index"].tolist()
    assert (onnx["confidence"] - pytorch["confidence"]).abs().max() < 1e-4


def test_missing_alias_fails_clearly(trained_csv_model, png_dataset, tmp_path):
    with pytest.raises(PredictionError, match="has no alias 'staging'"):
        predict_flow(
            PredictConfig(
                registered_model="shapes",
                alias="staging",
                image_dir=str(png_dataset["image_root"] / "img"),
                output_dir=str(tmp_path),
            )
        )


def test_dataset_test_split(prefect_server, mlflow_store, tmp_path):
    train_flow(
        TrainConfig(
            dataset="synthetic",
            model="mlp",
            epochs=1,
            data_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"),
        )
    )
    result = predict_flow(
        PredictConfig(
            registered_model="synthetic-mlp",
            dataset="synthetic",
            data_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"),
        )
    )
    assert result["images"] == 1000 and result["accuracy"] > 0.5
