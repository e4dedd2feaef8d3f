import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import http_files
from prefect import flow
from torchvision import datasets

from tasks.data import mnist_files
from tasks.data.mnist_files import ChecksumError, DownloadError, download_file, load_mnist_family
from tasks.data.sources import FashionMnistSource, MnistSource
from tasks.data.steps import fetch_dataset


def test_downloads_verifies_and_loads_through_torchvision(file_server, tmp_path):
    url = file_server.url
    data = load_mnist_family("FashionMNIST", tmp_path, mirror=url)
    assert data.train_images.shape == (20, 1, 28, 28) and data.test_labels.tolist() == list(range(10))
    assert data.class_names[0] == "T-shirt/top"
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_files_already_in_data_dir_are_used_without_network(tiny_fashion, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in tiny_fashion.items():
        (raw / name).write_bytes(blob)
    data = load_mnist_family("FashionMNIST", tmp_path, mirror="http://127.0.0.1:9/unreachable/")
    assert len(data.train_labels) == 20


def test_corrupted_download_fails_and_keeps_nothing(file_server, tmp_path):
    file_server.corrupt.add("train-labels-idx1-ubyte.gz")
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz has md5"):
        load_mnist_family("FashionMNIST", tmp_path, mirror=file_server.url)
    leftovers = [p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir()]
    assert "train-labels-idx1-ubyte.gz" not in leftovers and not any(n.endswith(".part") for n in leftovers)


def test_unreachable_mirror_fails_fast_naming_offline_choices(tmp_path, monkeypatch):
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download_file(["http://127.0.0.1:9/train.gz"], tmp_path / "train.gz", "0" * 32)
    assert time.monotonic() - started < 15
    for choice in ("--data-dir", "--dataset csv", "--dataset synthetic", "--dataset digits"):
        assert choice in str(error.value)
    assert not list(tmp_path.iterdir())


def test_a_file_over_the_cap_is_refused_at_once_naming_the_url_without_its_token(tmp_path):
    requests = []

    def answer(name):
        requests.append(name)
        return 200, b"x" * 5000

    target = tmp_path / "raw" / "train.gz"
    with http_files(answer) as root:
        with pytest.raises(DownloadError) as raised:
            download_file([f"{root}/train.gz?token=s3cret"], target, "0" * 32, max_bytes=4999)
    message = str(raised.value)
    assert f"{root}/train.gz?token=*** is 5000 bytes, over the limit of 4999 bytes" in message
    assert "s3cret" not in message and "--dataset synthetic" in message
    assert len(requests) == 1  # too big now is too big on a retry
    assert not list(target.parent.iterdir())


def test_a_download_past_its_deadline_fails_without_a_retry(file_server, tmp_path, monkeypatch):
    name = "train-labels-idx1-ubyte.gz"
    clock = SimpleNamespace(monotonic=iter(range(0, 10**6, 100)).__next__)  # 100 s pass per look
    monkeypatch.setattr(mnist_files.downloads, "time", clock)
    with pytest.raises(DownloadError, match=rf"{name} took longer than the 30 s allowed for this file"):
        download_file([file_server.url + name], tmp_path / name, "0" * 32, deadline_seconds=30)
    assert file_server.requests == [name] and not list(tmp_path.iterdir())


def test_default_mirrors_are_torchvisions():
    for source_class, torchvision_class in (
        (MnistSource, datasets.MNIST),
        (FashionMnistSource, datasets.FashionMNIST),
    ):
        assert mnist_files.torchvision_source(source_class.torchvision_name) is torchvision_class
        assert source_class.first_mirror == torchvision_class.mirrors[0]
        resources = torchvision_class.resources
        assert [archive for archive, _ in resources] == [f + ".gz" for f in mnist_files.RAW_FILES]


def test_transient_server_errors_are_retried_with_backoff(file_server, tmp_path):
    file_server.failures_left = 2  # the first two requests get HTTP 503
    data = load_mnist_family("FashionMNIST", tmp_path, mirror=file_server.url)
    assert len(data.train_labels) == 20
    assert file_server.requests[:3] == ["train-images-idx3-ubyte.gz"] * 3


def test_concurrent_downloads_of_one_data_dir_all_complete(file_server, tmp_path, monkeypatch):
    start = threading.Barrier(3)
    fetch, copy = mnist_files._fetch_with_backoff, mnist_files.shutil.copyfileobj

    def slowly(write):  # holds each temporary file open a while, so the writers overlap
        def written(*args):
            result = write(*args)
            time.sleep(0.2)
            return result

        return written

    monkeypatch.setattr(mnist_files, "_fetch_with_backoff", slowly(fetch))
    monkeypatch.setattr(mnist_files.shutil, "copyfileobj", slowly(copy))

    def load(_):
        start.wait()
        return load_mnist_family("FashionMNIST", tmp_path, mirror=file_server.url)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(load, range(3)))
    for data in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(data[:4], results[0][:4]))
    assert not [p.name for p in (tmp_path / "FashionMNIST" / "raw").iterdir() if p.name.endswith(".part")]


def test_a_damaged_archive_fails_and_leaves_no_partial_file(tiny_fashion, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in tiny_fashion.items():
        (raw / name).write_bytes(blob[:-20] if name.startswith("t10k-images") else blob)
    with pytest.raises(EOFError):
        load_mnist_family("FashionMNIST", tmp_path, mirror="http://127.0.0.1:9/unreachable/")
    left = [p.name for p in raw.iterdir()]
    assert "t10k-images-idx3-ubyte" not in left and not any(name.endswith(".part") for name in left)


@flow
def fetch_only(data_dir: Path, mirror: str):
    return fetch_dataset(FashionMnistSource(mirror=mirror), data_dir)


@pytest.mark.slow
def test_fetch_task_survives_a_flaky_server(prefect_server, file_server, tmp_path):
    file_server.failures_left = 6  # more than one attempt's backoff absorbs: the task itself retries
    ref = fetch_only(tmp_path, file_server.url)
    assert ref.train_size == 20 and Path(ref.prepared_path).exists()


@pytest.mark.slow
def test_fetch_task_fails_at_once_on_a_corrupted_file(prefect_server, file_server, tmp_path):
    file_server.corrupt.add("train-images-idx3-ubyte.gz")
    started = time.monotonic()
    with pytest.raises(ChecksumError):
        fetch_only(tmp_path, file_server.url)
    assert file_server.requests == ["train-images-idx3-ubyte.gz"]  # no retry of a checksum error
    assert time.monotonic() - started < 10
    assert not list((tmp_path / "FashionMNIST" / "raw").iterdir())
