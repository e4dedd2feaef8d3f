import gzip
import hashlib
import http.server
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from torchvision import datasets

from tasks import mnist_files
from tasks.mnist_files import ChecksumError, DownloadError, download_file, load_mnist_family


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """The original MNIST file format: magic, big-endian dims, raw uint8 data."""
    header = struct.pack(">I", 0x0800 | tensor.ndim) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    return header + tensor.numpy().tobytes()


@pytest.fixture
def tiny_fashion(monkeypatch) -> dict[str, bytes]:
    """Gzipped idx files of a 20+10 image FashionMNIST lookalike, with matching md5s."""
    generator = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte.gz": torch.randint(
            0, 256, (20, 28, 28), dtype=torch.uint8, generator=generator
        ),
        "train-labels-idx1-ubyte.gz": torch.arange(20, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": torch.randint(
            0, 256, (10, 28, 28), dtype=torch.uint8, generator=generator
        ),
        "t10k-labels-idx1-ubyte.gz": torch.arange(10, dtype=torch.uint8),
    }
    files = {name: gzip.compress(idx_bytes(tensor), mtime=0) for name, tensor in parts.items()}
    resources = [(name, hashlib.md5(blob).hexdigest()) for name, blob in files.items()]
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    return files


@pytest.fixture
def file_server(tiny_fashion):
    """Serves the tiny files on 127.0.0.1; `corrupt` names files to serve damaged."""
    corrupt: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").split("/")[-1]
            if name not in tiny_fashion:
                self.send_error(404)
                return
            body = tiny_fashion[name][:-5] + b"xxxxx" if name in corrupt else tiny_fashion[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/files/", corrupt
    server.shutdown()
    server.server_close()


def test_downloads_verifies_and_loads_through_torchvision(file_server, tmp_path):
    url, _ = file_server
    data = load_mnist_family("fashion-mnist", tmp_path, mirror=url)
    assert data.train_images.shape == (20, 1, 28, 28) and data.test_labels.tolist() == list(range(10))
    assert data.class_names[0] == "T-shirt/top"
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_files_already_in_data_dir_are_used_without_network(tiny_fashion, tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in tiny_fashion.items():
        (raw / name).write_bytes(blob)
    data = load_mnist_family("fashion-mnist", tmp_path, mirror="http://127.0.0.1:9/unreachable/")
    assert len(data.train_labels) == 20


def test_corrupted_download_fails_and_keeps_nothing(file_server, tmp_path):
    url, corrupt = file_server
    corrupt.add("train-labels-idx1-ubyte.gz")
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz has md5"):
        load_mnist_family("fashion-mnist", tmp_path, mirror=url)
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


def test_default_mirrors_are_torchvisions():
    assert mnist_files.SOURCES["mnist"].mirrors == datasets.MNIST.mirrors
    assert Path(datasets.MNIST.resources[0][0]).suffix == ".gz"
