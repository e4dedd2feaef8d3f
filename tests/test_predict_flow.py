"""End-to-end: predictions from a registry that a real training run filled."""

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_train_script, script_env
from mlflow import MlflowClient
from torchvision.io import write_png

from flows.config import PredictConfig, TrainConfig
from flows.predict_flow import predict_flow
from flows.train_flow import train_flow
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.predict.prediction import PredictionError

pytestmark = pytest.mark.slow
PREDICT_SCRIPT = REPO / "flows" / "predict_flow.py"


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
        script=PREDICT_SCRIPT,
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


def test_dask_partitions_merge_in_input_order(dask_cluster, trained_csv_model, png_dataset, tmp_path):
    def predict(output: str, **cluster) -> str:
        config = PredictConfig(
            registered_model="shapes",
            input_csv=str(png_dataset["test_csv"]),
            output=str(tmp_path / output),
            output_dir=str(tmp_path / "out"),
            **cluster,
        )
        return predict_flow(config)["predictions"]

    local = predict("local.csv")
    spread = predict("dask.csv", task_runner="dask", address=dask_cluster, partition_size=5)
    assert open(spread).read() == open(local).read()
    assert not list((tmp_path / "out").glob("*/parts/*"))  # partition files are merged away


def write_labelled_pngs(dataset_dir, folder, count: int) -> list[str]:
    """The first `count` synthetic test images as PNGs; returns 'path,label' rows."""
    data = load_tensors(prepare_dataset("synthetic", dataset_dir).tensors_path)
    folder.mkdir()
    rows = []
    for index in range(count):
        write_png(data.test_images[index], str(folder / f"{index}.png"))
        rows.append(f"{folder.name}/{index}.png,{data.class_names[int(data.test_labels[index])]}")
    return rows


def peak_anonymous_mb(cwd, *flags: str) -> float:
    """Runs the predict script; returns the peak of its own process's anonymous memory (RssAnon), in MB.

    Read from /proc while it runs: the rusage of a waited-for child would also count the
    temporary Prefect server it starts and stops. File-backed pages are left out: torch's
    libraries page in another ~110 MB while the interpreter exits, by an amount that differs
    between machines, and no image is ever held in them."""
    peak = 0
    with open(cwd / "predict.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(PREDICT_SCRIPT), *flags],
            cwd=cwd,
            # One malloc arena: per-thread arenas made the peak wander by +-150 MB between runs.
            env={**script_env(cwd), "MALLOC_ARENA_MAX": "1"},
            stdout=log,
            stderr=log,
        )
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:  # exited between poll and read
                break
            peak = max(
                [peak, *(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon"))]
            )
            time.sleep(0.01)
    assert process.returncode == 0, (cwd / "predict.log").read_text()[-3000:]
    return peak / 1024  # kB


def test_prediction_memory_does_not_grow_with_the_number_of_images(prefect_server, mlflow_store, tmp_path):
    folders = {"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    train_flow(TrainConfig(dataset="synthetic", model="mlp", epochs=1, registered_model="mem", **folders))
    rows = write_labelled_pngs(tmp_path / "data", tmp_path / "png", 500)
    small = 6000  # each decoded image held at once would cost about 4 kB, so 6x as many ~ +120 MB
    peaks = {}
    for count in (small, 6 * small):
        csv = tmp_path / f"{count}.csv"
        csv.write_text("\n".join(rows[i % len(rows)] for i in range(count)) + "\n")
        output = tmp_path / f"{count}-predictions.csv"
        # Both runs predict one partition at a time (two at once made the peak depend on how
        # they overlapped, by more than 100 MB): only the number of images differs.
        flags = ("--registered-model", "mem", "--input-csv", str(csv), "--output", str(output))
        flags += ("--partition-size", str(small // 2), "--max-parallel", "1")
        peaks[count] = peak_anonymous_mb(tmp_path, *flags, "--output-dir", folders["output_dir"])
    print(f"peak anonymous memory, MB: {peaks}")
    assert peaks[6 * small] - peaks[small] < 100, peaks

    few, many = (
        pd.read_csv(tmp_path / f"{small}-predictions.csv"),
        pd.read_csv(tmp_path / f"{6 * small}-predictions.csv"),
    )
    assert len(few) == small and len(many) == 6 * small
    pd.testing.assert_frame_equal(few, many.head(small))
    assert few["correct"].mean() > 0.5
