"""Runs under faults: several at once, the tracking server unreachable or going away, cancelled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import EPOCH_METRICS, TRAIN_SCRIPT, Processes, free_port, script_env, wait_until_up
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings
from prefect.states import Cancelling

pytestmark = pytest.mark.slow


def test_three_runs_at_once_share_folders_and_store_and_crown_the_best(tmp_path):
    env = script_env(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")  # MLflow's default store, sqlite:///mlflow.db in the folder
    flags = ("--dataset", "digits", "--model", "mlp", "--registered-model", "shared", "--threads", "1")
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


def test_an_unreachable_tracking_server_fails_the_run_at_once_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--dataset", "synthetic", "--epochs", "1"],
        cwd=tmp_path,
        env={**script_env(tmp_path), "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert f"the MLflow tracking server {uri} did not answer" in result.stderr
    assert not list(tmp_path.rglob("checkpoints/*"))


class TrainScript:
    """train_flow.py running in the background, its output read line by line as it comes."""

    def __init__(self, cwd: Path, env: dict, *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), *flags],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float = 300) -> float:
        """When a line holding `text` was printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if text in line:
                    return when
            assert self.process.poll() is None, self.output()
            time.sleep(0.05)
        raise TimeoutError(f"no {text!r} in:\n{self.output()}")

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def output(self) -> str:
        return "".join(line for _, line in self.lines)[-5000:]


def mlflow_server(processes: Processes, folder: Path, port: int) -> subprocess.Popen:
    server, log = processes.start(
        f"mlflow-{time.monotonic_ns()}",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "mlflow-artifacts"),
    )
    wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
    return server


def test_training_outlasts_a_tracking_server_restart_and_loses_no_metric(tmp_path, prefect_server):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    processes = Processes(tmp_path, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        server = mlflow_server(processes, tmp_path, port)
        # A tracking server's champion gate locks on a shared Prefect server: the session's.
        env = {
            **script_env(tmp_path),
            "MLFLOW_TRACKING_URI": uri,
            "PREFECT_API_URL": get_current_settings().api.url,
        }
        flags = ("--dataset", "synthetic", "--epochs", "4", "--registered-model", "outage", "--threads", "1")
        run = TrainScript(tmp_path, env, *flags)
        run.wait_for("epoch 1/4")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        killed_at = time.monotonic()
        run.wait_for("epoch 2/4")  # training goes on while the server is away
        time.sleep(max(0.0, killed_at + 15 - time.monotonic()))  # away for at least 15 s
        mlflow_server(processes, tmp_path, port)
        assert run.finish() == 0, run.output()
    finally:
        processes.stop_all()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, name)] == [1, 2, 3, 4], name
    assert client.get_model_version_by_alias("outage", "champion").run_id == mlflow_run.info.run_id


def test_runs_cancelled_in_prefect_or_sent_sigterm_mid_epoch_are_killed_and_retries_resume(
    tmp_path, prefect_server
):
    """Two runs at once on a running Prefect server, each with its own folder: one cancelled
    through the API as the UI's Cancel button does, one sent SIGTERM (what a worker sends the
    process of a cancelled deployment run)."""
    epochs = 6
    api_url = get_current_settings().api.url
    flags = ("--dataset", "synthetic", "--epochs", str(epochs), "--threads", "1")  # a core each
    envs = {how: {**script_env(tmp_path / how), "PREFECT_API_URL": api_url} for how in ("cancel", "sigterm")}
    runs = {}
    try:
        for how, env in envs.items():
            (tmp_path / how).mkdir()
            runs[how] = TrainScript(tmp_path / how, env, *flags)
        runs["sigterm"].wait_for(f"epoch 2/{epochs}")
        time.sleep(0.3)  # into epoch 3
        runs["sigterm"].process.send_signal(signal.SIGTERM)
        runs["cancel"].wait_for(f"epoch 2/{epochs}")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_of(envs["cancel"]), Cancelling(message="cancelled by a test"))
        for run in runs.values():
            assert run.finish(120) != 0
            assert f"epoch {epochs}/{epochs}" not in run.output()
    finally:
        for run in runs.values():
            run.process.kill()
            run.process.wait()
    assert "was cancelled in Prefect" in runs["cancel"].output()

    for how, env in envs.items():
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert mlflow_run_of(env).info.status == "KILLED", runs[how].output()
        [checkpoint] = (tmp_path / how).rglob("checkpoints/last.pt")
        assert len(torch.load(checkpoint, weights_only=True)["history"]) >= 2
        assert not list((tmp_path / how).rglob("*.part"))
        assert not client.search_registered_models()
    entrypoint = f"{TRAIN_SCRIPT}:train_flow"
    retries = {
        how: prefect_cli(env, "flow-run", "retry", flow_run_of(env), "--entrypoint", entrypoint)
        for how, env in envs.items()
    }
    try:
        outputs = {how: retry.communicate(timeout=600)[0] for how, retry in retries.items()}
    finally:
        for retry in retries.values():
            retry.kill()
            retry.wait()
    for how, retry in retries.items():
        assert retry.returncode == 0, outputs[how][-3000:]
        assert f"epoch 1/{epochs}" not in outputs[how]  # resumed, not restarted
        resumed = mlflow_run_of(envs[how])
        assert resumed.info.status == "FINISHED"
        client = MlflowClient(envs[how]["MLFLOW_TRACKING_URI"])
        for name in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(resumed.info.run_id, name)]
            assert steps == list(range(1, epochs + 1)), (how, name)


def prefect_cli(env: dict, *args: str) -> subprocess.Popen:
    """`prefect ARGS` started in the folder of `env`'s Prefect home."""
    command = [sys.executable, "-m", "prefect", *args]
    folder = Path(env["PREFECT_HOME"]).parent
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def mlflow_run_of(env: dict):
    """The one MLflow run in `env`'s tracking store."""
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    return mlflow_run


def flow_run_of(env: dict) -> str:
    """The Prefect flow run id of the one MLflow run in `env`'s store."""
    return mlflow_run_of(env).data.tags["prefect.flow_run_id"]
