"""Shared fixtures: a throwaway MLflow store, a Prefect test server, tiny datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "flows" / "train_flow.py"


def run_train_script(cwd: Path, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python flows/train_flow.py FLAGS` as a user would: its own temporary Prefect server,
    Prefect and MLflow state under `cwd`."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(TRAIN_SCRIPT), *flags]
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
