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
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelling

from flows.cli import parse_config
from flows.config import TrainConfig
from flows.train_flow import main, train_flow
from tasks.track import cancellation
from tasks.train import training

pytestmark = pytest.mark.slow
# The smallest real training: the MLP on scikit-learn's digits at their own 8x8 pixels.
TINY = {"dataset": "digits", "model": "mlp", "image_size": "8"}


def test_three_runs_at_once_share_folders_and_store_and_crown_the_best(tmp_path, prefect_server):
    """Three command lines in one folder, on one Prefect server (the session's: three temporary ones
    would spend a core for seconds each, and they are Prefect's own concern)."""
    env = {**script_env(tmp_path), "PREFECT_API_URL": get_current_settings().api.url}
    env.pop("MLFLOW_TRACKING_URI")  # MLflow's default store, sqlite:///mlflow.db in the folder, new
    flags = ("--dataset", "digits", "--model", "mlp", "--image-size", "8", "--registered-model", "shared")
    runs = [
        subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), *flags, "--threads", "1", "--seed", str(seed)]
            + ["--epochs", str(seed)],
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


def test_an_unreachable_tracking_server_fails_the_run_at_once_naming_it(tmp_path, monkeypatch):
    """The command line's run (its `main`, in this process) exits before any work."""
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        main(parse_config(["--dataset", "synthetic", "--epochs", "1"]))
    assert time.monotonic() - started < 30
    assert str(exited.value.code).startswith(f"error: the MLflow tracking server {uri} did not answer")
    assert list(tmp_path.iterdir()) == []  # no data, run folder, checkpoint or store


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


class Outage:
    """Kills the tracking server when the first epoch's training ends, and starts it again once the
    last epoch's has ended and it has been away for at least `away` seconds: every epoch's metrics
    reach MLflow through the outage, and epochs 2 and on train while the server is away."""

    def __init__(self, processes: Processes, folder: Path, port: int, epochs: int, away: float = 2) -> None:
        self.processes, self.folder, self.port, self.epochs, self.away = processes, folder, port, epochs, away
        self.server = mlflow_server(processes, folder, port)
        self.trained = threading.Event()  # the last epoch's training ended
        self.restarted_after_training: list[bool] = []
        self.errors: list[BaseException] = []
        self.done = 0

    def after_epoch(self) -> None:
        self.done += 1
        if self.done == 1:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
            threading.Thread(target=self._restart, args=(time.monotonic(),), daemon=True).start()
        if self.done == self.epochs:
            self.trained.set()

    def _restart(self, killed_at: float) -> None:
        # Bounded: training that waited for the server would never end its last epoch.
        self.restarted_after_training.append(self.trained.wait(120))
        time.sleep(max(0.0, killed_at + self.away - time.monotonic()))
        try:
            mlflow_server(self.processes, self.folder, self.port)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)


def test_training_outlasts_a_tracking_server_restart_and_loses_no_metric(
    tmp_path, prefect_server, monkeypatch
):
    port, epochs = free_port(), 4
    processes = Processes(tmp_path, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        outage = Outage(processes, tmp_path, port, epochs)
        real = training.train_one_epoch

        def then_outage(*args, **kwargs):
            metrics = real(*args, **kwargs)
            outage.after_epoch()
            return metrics

        monkeypatch.setattr(training, "train_one_epoch", then_outage)
        # A tracking server's champion gate locks on a shared Prefect server: the session's.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        config = TrainConfig(
            **TINY,
            epochs=epochs,
            registered_model="outage",
            tracking_patience_minutes=5,  # a server that never came back fails the run in minutes
            data_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "outputs"),
        )
        result = train_flow(config)
        assert outage.restarted_after_training == [True] and outage.errors == []
    finally:
        processes.stop_all()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert mlflow_run.info.run_id == result["mlflow_run_id"] and mlflow_run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, name)] == [1, 2, 3, 4], name
    assert client.get_model_version_by_alias("outage", "champion").run_id == mlflow_run.info.run_id


class TrainScript:
    """train_flow.py running in the background, its output read line by line as it comes; sent
    SIGTERM 0.3 s after the first line that holds `terminate_after` (into the next epoch)."""

    def __init__(self, cwd: Path, env: dict, *flags: str, terminate_after: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), *flags],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.terminate_after = terminate_after
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if self.terminate_after and self.terminate_after in line:
                self.terminate_after = ""
                threading.Timer(0.3, self.process.send_signal, (signal.SIGTERM,)).start()

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def output(self) -> str:
        return "".join(self.lines)[-5000:]


def cancel_after_epoch(monkeypatch, epoch: int) -> None:
    """The flow run that trains is set CANCELLING (as the UI's Cancel button does) when `epoch`'s
    training ends, and its watch asks at every step: it stops at the next epoch's first step."""
    monkeypatch.setattr(cancellation, "CHECK_EVERY_SECONDS", 0)
    real, done = training.train_one_epoch, []

    def then_cancel(*args, **kwargs):
        metrics = real(*args, **kwargs)
        done.append(1)
        if len(done) == epoch:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by a test"), force=True)
        return metrics

    monkeypatch.setattr(training, "train_one_epoch", then_cancel)


def test_runs_cancelled_in_prefect_or_sent_sigterm_mid_epoch_are_killed_and_retries_resume(
    tmp_path, prefect_server, monkeypatch
):
    """Two runs at once on a running Prefect server, each with its own folder: one cancelled through
    the API as the UI's Cancel button does (a flow run of this process), one a command line sent
    SIGTERM (what a worker sends the process of a cancelled deployment run). Both are retried as a
    user retries a command-line run: `prefect flow-run retry ID --entrypoint ...`."""
    api_url = get_current_settings().api.url
    envs = {
        how: {**script_env(tmp_path / how, True), "PREFECT_API_URL": api_url} for how in ("cancel", "sigterm")
    }
    epochs = 4
    # The CNN on synthetic images, on a core: about a second an epoch, so SIGTERM lands mid-epoch 3.
    flags = ("--dataset", "synthetic", "--epochs", str(epochs), "--threads", "1")
    sigterm = TrainScript(tmp_path / "sigterm", envs["sigterm"], *flags, terminate_after="epoch 2/4")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", envs["cancel"]["MLFLOW_TRACKING_URI"])
        cancel_after_epoch(monkeypatch, 2)
        config = TrainConfig(
            **TINY,
            epochs=epochs,
            data_dir=str(tmp_path / "cancel" / "data"),
            output_dir=str(tmp_path / "cancel" / "outputs"),
        )
        cancelled = train_flow(config, return_state=True)
        assert sigterm.finish(300) != 0
        assert "epoch 4/4" not in sigterm.output()
    finally:
        sigterm.process.kill()
        sigterm.process.wait()
    assert cancelled.is_cancelled() and "was cancelled in Prefect" in cancelled.message

    for how, env in envs.items():
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert mlflow_run_of(env).info.status == "KILLED", sigterm.output() if how == "sigterm" else how
        [checkpoint] = (tmp_path / how).rglob("checkpoints/last.pt")
        trained = len(torch.load(checkpoint, weights_only=True)["history"])
        assert trained == 2 or (how == "sigterm" and trained > 2)  # the cancelled run stops in epoch 3
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
        assert "epoch 1/4" not in outputs[how] and "epoch 4/4" in outputs[how]  # resumed, not restarted
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
