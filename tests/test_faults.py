"""Runs under faults: several at once, the tracking server unreachable or going away, cancelled."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import TRAIN_SCRIPT, script_env

pytestmark = pytest.mark.slow


def test_three_runs_at_once_share_folders_and_store_and_crown_the_best(tmp_path):
    env = script_env(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")  # MLflow's default store, sqlite:///mlflow.db in the folder
    flags = ("--dataset", "digits", "--model", "mlp", "--registered-model", "shared")
    runs = [
        subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), *flags, "--seed", str(seed), "--epochs", str(seed)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-3000:]
        assert "database is locked" not in output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("shared", "shared-onnx"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2, 3]
        best = max(versions, key=lambda v: float(v.tags["test_accuracy"]))
        assert client.get_model_version_by_alias(name, "champion").version == best.version
