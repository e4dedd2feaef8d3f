"""End-to-end: predictions from a registry that a real training run filled."""

import functools
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    REPO,
    run_train_script,
    script_env,
    seeded_mlflow_db,
    write_csv,
    write_image_folder,
    write_png_dataset,
)
from mlflow import MlflowClient
from prefect.settings import PREFECT_API_URL
from registered_models import hostile_loader, register, register_project_flavors, save_hostile_pyfunc

from flows.config import PredictConfig, TrainConfig
from flows.predict_flow import predict_flow
from flows.train_flow import train_flow
from tasks.data.decoding import Preprocessing
from tasks.predict.image_inputs import folder_inputs
from tasks.predict.prediction import PredictionError, RegisteredModel
from tasks.predict.steps import predict_partition

pytestmark = pytest.mark.slow
PREDICT_SCRIPT = REPO / "flows" / "predict_flow.py"


@dataclass(frozen=True)
class Store:
    """An MLflow store in `folder` (mlflow.db, its artefacts in mlruns/)."""

    folder: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    def use(self, patch: pytest.MonkeyPatch) -> None:
        patch.setenv("MLFLOW_TRACKING_URI", self.uri)
        patch.chdir(self.folder)  # MLflow's default artefact root ./mlruns


def new_store(folder: Path) -> Store:
    shutil.copyfile(seeded_mlflow_db(), folder / "mlflow.db")
    return Store(folder)


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory) -> dict[str, Path]:
    """conftest's PNG dataset (48 PNGs, train and test CSVs with labels 'left'/'right'), written once
    for the module: its tests only read it."""
    return write_png_dataset(tmp_path_factory.mktemp("png-dataset"))


@pytest.fixture(scope="module")
def trained_shapes(prefect_server, png_dataset, tmp_path_factory) -> tuple[Store, dict]:
    """A cnn trained once for the module on the PNG dataset, registered as 'shapes' (and
    'shapes-onnx'): its store and the flow's result."""
    store = new_store(tmp_path_factory.mktemp("shapes"))
    config = TrainConfig(
        dataset="csv",
        model="cnn",
        epochs=3,
        batch_size=8,
        registered_model="shapes",
        data_dir=str(store.folder / "data"),
        output_dir=str(store.folder / "outputs"),
        **{key: str(value) for key, value in png_dataset.items()},
    )
    with pytest.MonkeyPatch.context() as patch:
        store.use(patch)
        return store, train_flow(config)


@pytest.fixture
def trained_csv_model(trained_shapes, tmp_path, monkeypatch) -> dict:
    """The module's 'shapes', in this test's own copy of its store (tests add runs and versions;
    the copy points at the module's model artefacts, which none of them writes)."""
    store, result = trained_shapes
    shutil.copyfile(store.uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    Store(tmp_path).use(monkeypatch)
    return result


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
        seeded=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" in result.stderr  # Prefect's own: no PREFECT_API_URL
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


def test_a_version_from_a_trigger_is_scored_and_recorded_and_missing_ones_fail_clearly(
    trained_csv_model, png_dataset, tmp_path
):
    folder = str(png_dataset["image_root"] / "img")
    event = "0c3f9a52-7d1e-4f0a-9b8e-2a6f4d1c5e7b"
    client = MlflowClient()
    # The ONNX flavor's numbers run ahead of the PyTorch one's: version 1 of 'shapes' is 'shapes-onnx' 2.
    first_onnx = client.get_model_version("shapes-onnx", "1")
    client.create_model_version("shapes-onnx", first_onnx.source, run_id=None)
    client.delete_model_version("shapes-onnx", "1")
    client.create_model_version("shapes-onnx", first_onnx.source, run_id=trained_csv_model["mlflow_run_id"])
    result = predict_flow(
        PredictConfig(
            registered_model="shapes",
            version="1",
            trigger_event=event,
            image_dir=folder,
            output_dir=str(tmp_path),
        )
    )
    assert (result["model_uri"], result["model_version"]) == ("models:/shapes-onnx/3", "3")
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    assert (tags["trigger_event"], tags["model_version"], tags["model_uri"]) == (
        event,
        "3",
        "models:/shapes-onnx/3",
    )
    assert "model_alias" not in tags

    with pytest.raises(PredictionError, match="has no alias 'staging'"):
        predict_flow(
            PredictConfig(
                registered_model="shapes", alias="staging", image_dir=folder, output_dir=str(tmp_path)
            )
        )
    with pytest.raises(PredictionError, match="has no version 7 of 'shapes'"):
        predict_flow(
            PredictConfig(registered_model="shapes", version="7", image_dir=folder, output_dir=str(tmp_path))
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


def peak_anonymous_mb(cwd, *flags: str) -> float:
    """Runs the predict script; returns the peak of its own process's anonymous memory (RssAnon), in MB.

    Read from /proc while it runs: the rusage of a waited-for child would also count its own
    children. It uses the tests' Prefect server, not a temporary one of its own (seconds of start-up
    per run). File-backed pages are left out: torch's libraries page in another ~110 MB while the
    interpreter exits, by an amount that differs between machines, and no image is ever held in them."""
    peak = 0
    with open(cwd / "predict.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(PREDICT_SCRIPT), *flags],
            cwd=cwd,
            # One malloc arena: per-thread arenas made the peak wander by +-150 MB between runs.
            env={**script_env(cwd), "MALLOC_ARENA_MAX": "1", "PREFECT_API_URL": PREFECT_API_URL.value()},
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
    # 64x64 RGB images: each one held at once costs over 12 kB decoded and 48 kB as float pixels,
    # so the second run's 10,000 more would add 120 MB or more. (28x28 grey ones would take far
    # more images, and time, to show: 30,000 more of them, all kept decoded, stay under 100 MB.)
    rows = write_image_folder(tmp_path, 200, size=64, channels=3)
    csvs = {"train_csv": write_csv(tmp_path / "train.csv", rows[:160]), "image_root": tmp_path}
    csvs["test_csv"] = write_csv(tmp_path / "test.csv", rows[160:])
    folders = {"data_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    config = TrainConfig(
        dataset="csv",
        model="mlp",
        epochs=1,  # enough for the accuracy checked below: the memory is the point
        batch_size=16,
        augment="none",  # the class is which half is bright: a flip would swap it
        registered_model="mem",
        **{key: str(value) for key, value in csvs.items()},
        **folders,
    )
    train_flow(config)
    small = 2000
    peaks = {}
    for count in (small, 6 * small):
        csv = write_csv(tmp_path / f"{count}.csv", [rows[i % len(rows)] for i in range(count)], header=False)
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


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory) -> Store:
    """'shapes' and 'shapes-onnx' as training registers them (version 1), then a python_function model
    whose loader writes folder/marker registered under both, with `champion` moved to it (version 2)."""
    store = new_store(tmp_path_factory.mktemp("hostile"))
    with pytest.MonkeyPatch.context() as patch:
        store.use(patch)
        register_project_flavors("shapes", store.folder)
        loader = hostile_loader(store.folder / "code", store.folder / "marker")
        assert [
            register(name, functools.partial(save_hostile_pyfunc, loader))
            for name in ("shapes", "shapes-onnx")
        ] == ["2", "2"]
    return store


@pytest.fixture
def hostile_champion(hostile_store, monkeypatch) -> Path:
    """The module's hostile registry, in use; the marker's path (never written by the tests that
    refuse the champion, which read the registry only)."""
    hostile_store.use(monkeypatch)
    marker = hostile_store.folder / "marker"
    assert not marker.exists()
    return marker


@pytest.mark.parametrize("flavor,runner", [("onnx", "threads"), ("pytorch", "dask")])
def test_a_hostile_champion_is_refused_naming_its_version(
    prefect_server, hostile_champion, png_dataset, tmp_path, flavor, runner
):
    config = PredictConfig(
        registered_model="shapes",
        flavor=flavor,
        task_runner=runner,  # dask: a local cluster, which the refusal comes before
        image_dir=str(png_dataset["image_root"] / "img"),
        output_dir=str(tmp_path / "out"),
    )
    name = "shapes-onnx" if flavor == "onnx" else "shapes"
    with pytest.raises(PredictionError, match=f"model '{name}' version 2 \\(flavors: python_function\\)"):
        predict_flow(config)
    assert not hostile_champion.exists()
    assert not (tmp_path / "out").exists()  # refused before any run folder or prediction


def test_a_dask_worker_refuses_a_version_it_is_handed(
    dask_cluster, hostile_champion, hostile_store, png_dataset, tmp_path
):
    """A worker checks the version it is told to load itself, whoever built the RegisteredModel."""
    from distributed import Client

    forged = RegisteredModel(
        "models:/shapes/2", "2", "run", ("left", "right"), (1, 12, 12), Preprocessing(1, (12, 12))
    )
    inputs = folder_inputs(png_dataset["image_root"] / "img")
    output = tmp_path / "part.csv"
    with Client(dask_cluster, timeout=60) as client:
        worker = {"workers": next(iter(client.scheduler_info()["workers"])), "pure": False}  # one import
        uri = hostile_store.uri
        future = client.submit(predict_partition.fn, forged, inputs, 8, output, uri, **worker)
        with pytest.raises(PredictionError, match="model 'shapes' version 2 \\(flavors: python_function\\)"):
            future.result(timeout=120)
        # A worker loads the version training registered: it is the check that refused the other.
        good = RegisteredModel(
            "models:/shapes/1", "1", "run", ("left", "right"), (1, 12, 12), Preprocessing(1, (12, 12))
        )
        counts = client.submit(predict_partition.fn, good, inputs, 8, output, uri, **worker)
        assert counts.result(timeout=120)["images"] == 48
    assert not hostile_champion.exists()
