"""A trial's data on a worker that may or may not see the flow's prepared file."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_csv, write_image_folder

from tasks.data import datasets, local_copy
from tasks.data.datasets import DatasetRef, load_tensors, prepare_dataset
from tasks.data.local_copy import DataRecipe, DatasetMismatchError, copy_problem, dataset_here
from tasks.data.sources import CsvSource, DigitsSource

RELATIVE_CSVS = CsvSource(train_csv="photos/train.csv", test_csv="photos/test.csv", image_root="photos")


def elsewhere(ref: DatasetRef, tmp_path: Path) -> DatasetRef:
    """`ref` as a worker on another machine gets it: a prepared_path from the flow's machine."""
    return replace(ref, prepared_path=str(tmp_path / "flow-machine" / Path(ref.prepared_path).name))


def count_preparations(monkeypatch) -> list[str]:
    """The data folders prepare_dataset runs for (the real one still runs, a little later, so that
    trials started together all find the copy missing)."""
    calls, real = [], datasets.prepare_dataset

    def counted(source, data_dir, *args):
        calls.append(str(data_dir))
        time.sleep(0.2)
        return real(source, data_dir, *args)

    monkeypatch.setattr(local_copy, "prepare_dataset", counted)
    return calls


def test_a_worker_that_sees_the_flows_file_reads_it_where_it_is(tmp_path, monkeypatch):
    ref = prepare_dataset(DigitsSource(), tmp_path / "data")
    calls = count_preparations(monkeypatch)
    assert dataset_here(ref, DataRecipe(DigitsSource(), str(tmp_path / "other"))) == ref
    assert calls == [] and not (tmp_path / "other").exists()


def test_a_worker_elsewhere_prepares_once_into_its_own_data_dir_for_trials_started_together(
    tmp_path, monkeypatch
):
    ref = prepare_dataset(DigitsSource(), tmp_path / "flow" / "data")
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.chdir(worker)  # the recipe's relative data_dir is the worker's own
    calls = count_preparations(monkeypatch)
    got: list[DatasetRef] = []
    recipe = DataRecipe(DigitsSource(), "data")
    trials = [
        threading.Thread(target=lambda: got.append(dataset_here(elsewhere(ref, tmp_path), recipe)))
        for _ in range(3)
    ]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join()

    assert calls == [str(worker / "data")]  # one preparation; the others waited and reused it
    local = worker / "data" / "prepared" / Path(ref.prepared_path).name
    assert [Path(r.prepared_path) for r in got] == [local] * 3
    assert got[0] == replace(ref, prepared_path=str(local))  # the same data, digest and statistics
    assert torch.equal(load_tensors(str(local)).test_images, load_tensors(ref.prepared_path).test_images)
    dataset_here(elsewhere(ref, tmp_path), recipe)
    assert len(calls) == 1  # a later trial on this worker finds the copy by its digest


def test_a_damaged_copy_is_prepared_again(tmp_path, monkeypatch):
    ref = prepare_dataset(DigitsSource(), tmp_path / "flow")
    local = local_copy.local_path(ref, tmp_path / "worker")
    dataset_here(elsewhere(ref, tmp_path), DataRecipe(DigitsSource(), str(tmp_path / "worker")))
    with open(local, "r+b") as handle:
        handle.truncate(local.stat().st_size - 10)
    assert "bytes" in copy_problem(local, ref)
    calls = count_preparations(monkeypatch)
    assert dataset_here(
        elsewhere(ref, tmp_path), DataRecipe(DigitsSource(), str(tmp_path / "worker"))
    ).prepared_path == str(local)
    assert len(calls) == 1 and copy_problem(local, ref) is None


def photos(root: Path, seed: int) -> None:
    rows = write_image_folder(root / "photos", 16, seed=seed)
    write_csv(root / "photos" / "train.csv", rows[:12])
    write_csv(root / "photos" / "test.csv", rows[12:])


@pytest.mark.slow
def test_source_paths_resolve_on_the_worker_and_other_data_there_is_refused(tmp_path, monkeypatch):
    recipe = DataRecipe(RELATIVE_CSVS, "data")  # paths as given: each machine resolves them
    for name, seed in (("flow", 0), ("same", 0), ("other", 1)):
        photos(tmp_path / name, seed)
    monkeypatch.chdir(tmp_path / "flow")
    ref = prepare_dataset(RELATIVE_CSVS, Path("data").resolve())
    assert ref.train_origin == str(tmp_path / "flow" / "photos" / "train.csv")

    monkeypatch.chdir(tmp_path / "same")  # the same photos under the worker's own working directory
    assert dataset_here(elsewhere(ref, tmp_path), recipe).sha256 == ref.sha256
    assert (tmp_path / "same" / "data" / "prepared" / Path(ref.prepared_path).name).is_file()

    monkeypatch.chdir(tmp_path / "other")  # other photos under the same names
    with pytest.raises(DatasetMismatchError) as refused:
        dataset_here(elsewhere(ref, tmp_path), recipe)
    message = str(refused.value)
    assert ref.sha256 in message and socket.gethostname() in message
    [made] = (tmp_path / "other" / "data" / "prepared").glob("csv-*.safetensors")
    assert made.name.removeprefix("csv-")[:16] in message and "same source" in message


def report_error(dataset: DatasetRef, recipe: DataRecipe, queue) -> None:
    try:
        dataset_here(dataset, recipe)
        queue.put("prepared")
    except Exception as error:  # noqa: BLE001 - the parent test reads it
        queue.put(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_a_daemonic_worker_that_must_decode_photos_says_how_to_start_it(tmp_path, monkeypatch):
    photos(tmp_path, 0)
    monkeypatch.chdir(tmp_path)
    recipe = DataRecipe(RELATIVE_CSVS, "worker-data")
    ref = prepare_dataset(RELATIVE_CSVS, tmp_path / "data")
    context = multiprocessing.get_context("fork")  # a Dask worker under its nanny is daemonic
    queue = context.SimpleQueue()
    child = context.Process(target=report_error, args=(elsewhere(ref, tmp_path), recipe, queue), daemon=True)
    child.start()
    child.join(60)
    said = queue.get()
    assert said.startswith("CannotPrepareHereError") and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in said
