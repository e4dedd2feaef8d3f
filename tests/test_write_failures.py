"""The disk fills up during a write: every writer raises OutputWriteError naming its file, the file
already there (the previous checkpoint) is untouched, no temporary file is left, nothing registered."""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fewer_training_images
from mlflow import MlflowClient

from common.files import OutputWriteError, atomic_output, atomic_save
from models import ModelSpec, build_from_spec
from tasks.data.datasets import prepare_dataset
from tasks.data.loaders import TensorLoader, make_loaders
from tasks.data.sources import SyntheticSource
from tasks.publish.export import write_onnx
from tasks.publish.plots import plot_confusion_matrix, plot_learning_curves
from tasks.publish.steps import evaluate_model
from tasks.track import tracking
from tasks.train.checkpoints import load_model
from tasks.train.steps import TrainedModel
from tasks.train.sweep_steps import report_trials
from tasks.train.sweeps import plot_by_setting, trials_table
from tasks.train.training import TrainSettings, train

NO_SPACE = f"\\[Errno {errno.ENOSPC}\\] {os.strerror(errno.ENOSPC)}"


class FullDisk:
    """A file being written to a disk with `room` bytes left: the first bytes land, then write()
    raises ENOSPC, as write(2) does."""

    def __init__(self, handle: io.IOBase, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._room:
            self._handle.write(data[: self._room] if isinstance(data, str) else bytes(data)[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._handle.write(data)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")  # C writers (PIL's encoder) then write through write()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def fill_disk(monkeypatch):
    """`fill_disk(pattern, room, after)`: files whose name matches `pattern` that are opened for
    writing, after the first `after` of them, get only `room` bytes. Returns the names that failed."""
    real_open, failed = builtins.open, []

    def install(pattern: str, room: int = 1000, after: int = 0) -> list[str]:
        opened = []

        def open_on_full_disk(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            name = os.path.basename(os.fsdecode(file)) if isinstance(file, (str, os.PathLike)) else ""
            if not (set(mode) & set("wax+") and fnmatch.fnmatch(name, pattern)):
                return handle
            opened.append(name)
            if len(opened) <= after:
                return handle
            failed.append(name)
            return FullDisk(handle, room)

        monkeypatch.setattr(builtins, "open", open_on_full_disk)
        return failed

    return install


def assert_only(folder: Path, *names: str) -> None:
    """`folder` holds exactly `names`: no temporary `.part` file, nothing half-written."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_checkpoint_write_fails_and_the_previous_checkpoint_stays(tmp_path, fill_disk):
    target = tmp_path / "last.pt"
    atomic_save({"epoch": 1, "w": torch.ones(1000)}, target)
    previous = target.read_bytes()
    failed = fill_disk(".last.pt.*.part", room=5000)
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}") as caught:
        atomic_save({"epoch": 2, "w": torch.zeros(1000)}, target)
    assert failed and caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_bytes() == previous
    assert_only(tmp_path, "last.pt")


def test_text_output_fails_whole(tmp_path, fill_disk):
    target = tmp_path / "rows.csv"
    target.write_text("old\n")
    fill_disk(".rows.csv.*.part", room=10)
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        with atomic_output(target) as handle:
            for row in range(100):
                handle.write(f"{row},{row}\n")
                handle.flush()  # the text layer buffers; a full disk shows on the way through
    assert target.read_text() == "old\n"
    assert_only(tmp_path, "rows.csv")


def test_onnx_export_fails_and_the_previous_file_stays(tmp_path, fill_disk):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")
    failed = fill_disk(".model.onnx.*.part", room=1000)
    model = build_from_spec(ModelSpec("mlp", 1, (8, 8), 3, (0.5,), (0.5,)))
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        write_onnx(model, torch.rand(2, 1, 8, 8), target)
    assert failed and target.read_bytes() == b"the previous export"
    assert_only(tmp_path, "model.onnx")


def test_plots_fail_whole_and_close_their_figures(tmp_path, fill_disk):
    import matplotlib.pyplot as plt

    target = tmp_path / "cm.png"
    target.write_bytes(b"old plot")
    failed = fill_disk(".*.png.*.part", room=100)
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        plot_confusion_matrix(torch.tensor([[5, 1], [0, 7]]), ("a", "b"), target)
    curves = tmp_path / "curves.png"
    with pytest.raises(OutputWriteError, match=f"cannot write {curves}"):
        plot_learning_curves(
            [dict.fromkeys(("train_loss", "val_loss", "train_accuracy", "val_accuracy"), 1.0)], curves
        )
    sweep = tmp_path / "sweep.png"
    rows = [{"trial": 1, "status": "finished", "lr": 0.1, "val_accuracy": 0.9, "val_loss": 0.2}]
    with pytest.raises(OutputWriteError, match=f"cannot write {sweep}"):
        plot_by_setting(trials_table(rows, ["lr"]), ["lr"], sweep)
    assert len(failed) == 3 and target.read_bytes() == b"old plot"
    assert_only(tmp_path, "cm.png")
    assert plt.get_fignums() == []


def test_per_class_metrics_fail_whole_and_the_previous_table_stays(tmp_path, fill_disk):
    spec = ModelSpec("mlp", 1, (8, 8), 3, (0.5,), (0.5,))
    checkpoint = tmp_path / "last.pt"
    atomic_save({"model": build_from_spec(spec).state_dict()}, checkpoint)
    trained = TrainedModel(spec, str(checkpoint), [])
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    test = TensorLoader(images, torch.arange(30) % 3, batch_size=16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / "per_class_metrics.csv"
    target.write_text("the previous table\n")
    failed = fill_disk(".per_class_metrics.csv.*.part", room=10)
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        evaluate_model.fn(trained, trained.weights(), test, ("a", "b", "c"), run_dir, "no-run: fails first")
    assert failed and target.read_text() == "the previous table\n"
    assert_only(run_dir, "per_class_metrics.csv")


def test_test_logits_fail_whole_and_the_previous_array_stays(tmp_path, fill_disk):
    spec = ModelSpec("mlp", 1, (8, 8), 3, (0.5,), (0.5,))
    checkpoint = tmp_path / "last.pt"
    atomic_save({"model": build_from_spec(spec).state_dict()}, checkpoint)
    images = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8)
    test = TensorLoader(images, torch.arange(300) % 3, batch_size=128)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / "test_logits.npy"
    target.write_bytes(b"the previous logits")
    failed = fill_disk(".test_logits.npy.*.part", room=1000)  # 300 x 3 float32: 3.6 kB and a header
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        trained = TrainedModel(spec, str(checkpoint), [])
        evaluate_model.fn(trained, trained.weights(), test, ("a", "b", "c"), run_dir, "no-run")
    assert len(failed) == 1 and target.read_bytes() == b"the previous logits"
    assert_only(run_dir, "per_class_metrics.csv", "test_logits.npy")


def test_trials_table_fails_whole_and_the_previous_table_stays(tmp_path, fill_disk):
    target = tmp_path / "trials.csv"
    target.write_text("the previous table\n")
    rows = [{"trial": i, "status": "finished", "lr": i / 10, "val_accuracy": 0.5} for i in range(1, 50)]
    failed = fill_disk(".trials.csv.*.part", room=100)
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: {NO_SPACE}"):
        report_trials.fn(rows, ["lr"], tmp_path, "no-run: fails before logging", "key")
    assert failed and target.read_text() == "the previous table\n"
    assert_only(tmp_path, "trials.csv")


def test_artefact_copy_into_a_full_local_store_names_both_files(mlflow_store, tmp_path, monkeypatch):
    run_id = tracking.start_run("e", "r", {})
    artefact = tmp_path / "model.onnx"
    artefact.write_bytes(b"x" * 10_000)
    real_copy = shutil.copyfileobj

    def copy_onto_full_disk(source, destination, length=0):
        destination.write(source.read(100))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", copy_onto_full_disk)
    with pytest.raises(OutputWriteError, match=f"cannot copy {artefact} to .*mlruns.*{NO_SPACE}") as caught:
        tracking.log_artifacts(run_id, [artefact], "onnx")
    assert caught.value.filename.endswith(os.path.join(run_id, "artifacts", "onnx", "model.onnx"))
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)  # not undo(): that also resets mlflow_store
    store = Path(caught.value.filename).parent
    assert not store.exists() or list(store.iterdir()) == []  # MLflow staged and removed its copy
    assert MlflowClient().list_artifacts(run_id, "onnx") == []


def test_remote_artefact_store_errors_pass_unchanged(monkeypatch, tmp_path):
    class RemoteStore:
        def log_artifact(self, *args):
            raise ConnectionError("server went away")  # an OSError, but not about a local disk

        def get_run(self, run_id):
            return SimpleNamespace(info=SimpleNamespace(artifact_uri="mlflow-artifacts:/1/x"))

    monkeypatch.setattr(tracking, "get_client", RemoteStore)
    with pytest.raises(ConnectionError, match="server went away"):
        tracking.log_artifacts("x", [tmp_path / "a.png"])


def test_checkpoint_failing_at_epoch_two_leaves_epoch_one_loadable(tmp_path, fill_disk):
    ref = prepare_dataset(SyntheticSource(), tmp_path / "data")
    spec = ModelSpec("mlp", ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)
    loaders = fewer_training_images(make_loaders(ref, 64, 0.1, 0, "cpu"), ref, 320)
    checkpoint = tmp_path / "run" / "last.pt"
    settings = TrainSettings(2, "adamw", 3e-3, 1e-4, "onecycle", seed=0)
    fill_disk(".last.pt.*.part", room=2000, after=1)
    with pytest.raises(OutputWriteError, match=f"cannot write {checkpoint}: {NO_SPACE}"):
        train(spec, loaders, settings, checkpoint)
    assert len(torch.load(checkpoint, weights_only=True)["history"]) == 1
    assert_only(checkpoint.parent, "last.pt")


@pytest.mark.slow
def test_flow_with_a_full_disk_at_onnx_export_fails_and_registers_nothing(
    prefect_server, mlflow_store, tmp_path, fill_disk
):
    from flows.config import TrainConfig
    from flows.train_flow import train_flow

    outputs = tmp_path / "outputs"
    config = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=1,
        data_dir=str(tmp_path / "data"),
        output_dir=str(outputs),
        experiment="full-disk",
    )
    failed = fill_disk(".model.onnx.*.part", room=4096)
    with pytest.raises(OutputWriteError, match=f"cannot write .*model.onnx: {NO_SPACE}"):
        train_flow(config)
    assert len(failed) == 1  # the ONNX export's one temporary file

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("full-disk").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_registered_models() == []
    assert client.search_model_versions("name = 'synthetic-mlp'") == []
    [run_dir] = outputs.iterdir()
    assert not (run_dir / "model.onnx").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(checkpoint["history"]) == 1
    ref = prepare_dataset(SyntheticSource(), tmp_path / "data")
    spec = ModelSpec("mlp", ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)
    load_model(spec, checkpoint["model"])
    assert list(tmp_path.rglob("*.part")) == []
