"""Shared fixtures: a throwaway MLflow store, a Prefect test server, tiny datasets."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torchvision import datasets
from torchvision.io import write_png

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
REPO = Path(__file__).resolve().parents[1]
# What the issue asks MLflow to hold for every epoch.
EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
    "samples_per_second",
    "lr",
)
TRAIN_SCRIPT = REPO / "flows" / "train_flow.py"


def run_train_script(
    cwd: Path, *flags: str, timeout: int = 600, script: Path = TRAIN_SCRIPT
) -> subprocess.CompletedProcess:
    """Runs `python flows/train_flow.py FLAGS` (or another script) as a user would: its own
    temporary Prefect server, Prefect and MLflow state under `cwd`."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(script), *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite-backed MLflow tracking store and registry in a temporary folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artefact root ./mlruns lands here too
    return uri


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server on 127.0.0.1 for the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_image_folder(
    root: Path, count: int, size: int = 12, channels: int = 1, seed: int = 0
) -> list[tuple[str, int]]:
    """Writes `count` PNGs whose class (0 or 1) is their bright half: left or right."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % 2
        image = (torch.rand(channels, size, size, generator=generator) * 60).to(torch.uint8)
        half = slice(0, size // 2) if label == 0 else slice(size // 2, size)
        image[:, :, half] += 180
        name = f"img/{index:03d}.png"
        write_png(image, str(root / name))
        rows.append((name, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, object]], header: bool = True) -> Path:
    lines = (["image,label"] if header else []) + [f"{name},{label}" for name, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def png_dataset(tmp_path: Path) -> dict[str, Path]:
    """A folder of PNGs with train and test CSVs (string labels 'left'/'right')."""
    names = {0: "left", 1: "right"}
    rows = [(name, names[label]) for name, label in write_image_folder(tmp_path, 48)]
    return {
        "image_root": tmp_path,
        "train_csv": write_csv(tmp_path / "train.csv", rows[:36]),
        "test_csv": write_csv(tmp_path / "test.csv", rows[36:]),
    }


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


@dataclass
class FileServer:
    url: str
    corrupt: set[str] = field(default_factory=set)  # files to serve damaged
    failures_left: int = 0  # requests to answer with HTTP 503 first
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def file_server(tiny_fashion):
    """Serves the tiny FashionMNIST files on 127.0.0.1, optionally failing or corrupting them."""
    state = FileServer("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").split("/")[-1]
            state.requests.append(name)
            if state.failures_left > 0:
                state.failures_left -= 1
                self.send_error(503)
                return
            if name not in tiny_fashion:
                self.send_error(404)
                return
            body = tiny_fashion[name][:-5] + b"xxxxx" if name in state.corrupt else tiny_fashion[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/files/"
    yield state
    server.shutdown()
    server.server_close()
