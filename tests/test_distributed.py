"""One training in two processes (DistributedDataParallel, gloo on CPU) started by torch's elastic
launcher from the train step: recorded once, registered, resumed after a killed rank, cancelled,
and never leaving a rank behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from conftest import EPOCH_METRICS, TRAIN_SCRIPT, free_port, script_env
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.states import Cancelling

from flows.config import TrainConfig
from flows.train_flow import train_flow
from models import ModelSpec
from tasks.data.datasets import prepare_dataset
from tasks.data.digits import DigitsSource
from tasks.data.loaders import make_loaders
from tasks.data.source_base import Shape
from tasks.track import cancellation, tracking
from tasks.train import launch, parallel
from tasks.train import steps as train_steps
from tasks.train.parallel import Parallel
from tasks.train.steps import train_logged
from tasks.train.training import TrainSettings

pytestmark = pytest.mark.slow
# The CNN on digits at 48 px: about a second an epoch in two processes on 2 cores, so a kill or a
# cancel lands mid-epoch; batch 64 is the global batch, 32 per process.
DIGITS = {"dataset": "digits", "model": "cnn", "image_size": "48", "batch_size": 64, "epochs": 3}


def config(folder: Path, **overrides) -> TrainConfig:
    settings = {**DIGITS, "data_dir": str(folder.parent / "data"), "output_dir": str(folder / "outputs")}
    return TrainConfig(**{**settings, **overrides})


def rank_processes() -> list[psutil.Process]:
    """The ranks this process started (and any they started), alive or not yet reaped."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "tasks.train.ranks" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def rank_process(rank: int) -> psutil.Process:
    [process] = [p for p in rank_processes() if p.environ().get("RANK") == str(rank)]
    return process


def weights(result: dict) -> dict[str, torch.Tensor]:
    return torch.load(Path(result["run_dir"], "model_weights.pth"), weights_only=True)


def on_event(monkeypatch, react) -> None:
    """`react(event)` before the train step handles each of rank 0's events."""
    real = parallel.RankCallbacks.__call__

    def relayed(self, event):
        react(event)
        return real(self, event)

    monkeypatch.setattr(parallel.RankCallbacks, "__call__", relayed)


@pytest.fixture(scope="module")
def straight(prefect_server, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted two-process run (its MLflow store and result), for the module's comparisons."""
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.chdir(folder)
        result = train_flow(config(folder, devices="2", registered_model="ddp"))
    assert not rank_processes()
    return folder, result


def test_two_processes_train_one_model_recorded_once_and_registered(straight):
    folder, result = straight
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and result["versions"] == {"ddp": "1", "ddp-onnx": "1"}
    assert result["alias"] == "champion" and run.data.metrics["onnx_top1_agreement"] == 1.0
    for name in EPOCH_METRICS:  # rank 0's epochs, each logged once
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3], name
    assert run.data.params["world_size"] == "2" and run.data.params["batch_per_process"] == "32"
    assert run.data.tags["backend"] == "gloo" and run.data.tags["train_on"] == "local"
    assert run.data.tags["threads"] == str(max(1, torch.get_num_threads() // 2))



def test_a_killed_rank_fails_the_group_in_seconds_and_the_retry_resumes_to_the_same_weights(
    straight, prefect_server, mlflow_store, tmp_path, monkeypatch
):
    killed, failed = [], []

    def kill_rank_1_in_epoch_2(event):
        if event["kind"] == "batch" and event["epoch"] >= 2 and not killed:
            rank_process(1).send_signal(signal.SIGKILL)
            killed.append(time.monotonic())

    real_relay = launch.relay

    def timed_relay(*args):
        try:
            real_relay(*args)
        except launch.RanksFailedError as error:
            failed.append((time.monotonic(), str(error)))
            raise

    on_event(monkeypatch, kill_rank_1_in_epoch_2)
    monkeypatch.setattr(launch, "relay", timed_relay)
    monkeypatch.setattr(train_steps.train_model, "retry_delay_seconds", 0)
    result = train_flow(config(tmp_path, devices="2", registered_model="ddp", train_retries=1))

    [(failed_at, message)] = failed
    print(f"rank 1 killed: the train step failed {failed_at - killed[0]:.1f} s later: {message}")
    assert failed_at - killed[0] < 60 and "rank 1" in message and "SIGKILL" in message
    client = MlflowClient()
    for name in EPOCH_METRICS:  # the retry resumed from epoch 2's start: each epoch once
        assert [m.step for m in client.get_metric_history(result["mlflow_run_id"], name)] == [1, 2, 3]
    resumed, uninterrupted = weights(result), weights(straight[1])
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not rank_processes()


def test_cancelling_the_flow_run_stops_every_rank_and_kills_the_mlflow_run(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    monkeypatch.setattr(cancellation, "CHECK_EVERY_SECONDS", 0)

    def cancel_after_epoch_1(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by a test"), force=True)

    on_event(monkeypatch, cancel_after_epoch_1)
    state = train_flow(config(tmp_path, devices="2", epochs=2), return_state=True)
    assert state.is_cancelled() and "was cancelled in Prefect" in state.message
    assert not rank_processes()
    [run] = mlflow.search_runs(experiment_names=["image-classifier"], output_format="list")
    assert run.info.status == "KILLED"
    [checkpoint] = tmp_path.rglob("checkpoints/last.pt")
    assert len(torch.load(checkpoint, weights_only=True)["history"]) < 2


def test_a_hung_rank_fails_the_group_within_the_collective_timeout(tmp_path, mlflow_store, monkeypatch):
    """SIGSTOP rank 1: rank 0 waits on it for --collective-timeout-seconds, fails, and the launcher
    stops the group. (A stopped rank takes SIGTERM only once continued: torch's launcher gives it 30 s
    before SIGKILL. The test continues it once rank 0 has failed, so as not to wait them out.)"""
    dataset = prepare_dataset(DigitsSource(), tmp_path / "data", shape=Shape("1", (24, 24)))
    loaders = make_loaders(dataset, 64, 0.1, 0, "cpu")
    spec = ModelSpec("cnn", 1, (24, 24), 10, dataset.mean, dataset.std)
    stopped, rank_0_failed = [], []

    def continue_rank_1_once_rank_0_fails(rank_0: psutil.Process, rank_1: psutil.Process) -> None:
        while rank_0.is_running() and rank_0.status() != psutil.STATUS_ZOMBIE:  # not reaped: not ours
            time.sleep(0.05)
        rank_0_failed.append(time.monotonic())
        rank_1.send_signal(signal.SIGCONT)

    def stop_rank_1(event):
        if event["kind"] == "batch" and not stopped:
            rank_1 = rank_process(1)
            rank_1.send_signal(signal.SIGSTOP)
            stopped.append(time.monotonic())
            watch = (rank_process(0), rank_1)
            threading.Thread(target=continue_rank_1_once_rank_0_fails, args=watch, daemon=True).start()

    on_event(monkeypatch, stop_rank_1)
    run_id = tracking.start_run("hang", "hang", {})
    settings = TrainSettings(20, "adamw", 1e-3, 0.0, "onecycle", 0)
    timeout = 3
    two = Parallel(2, dataset, 0.1, timeout_seconds=timeout)
    with pytest.raises(launch.RanksFailedError) as failure:
        train_logged(spec, loaders, settings, tmp_path, run_id, parallel=two)
    seconds = rank_0_failed[0] - stopped[0]
    print(f"rank 1 stopped: rank 0 failed {seconds:.1f} s later ({failure.value})")
    assert timeout <= seconds < timeout + 10 and "rank 0" in str(failure.value)
    assert not rank_processes()


def test_torchrun_starts_the_script_once_per_rank_and_rank_0_alone_records(prefect_server, tmp_path):
    """`torchrun ... flows/train_flow.py` as the docs show it for several machines, here with one
    node of two processes: rank 0 runs the flow, rank 1 prepares the data itself and trains."""
    rendezvous = f"127.0.0.1:{free_port()}"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", rendezvous, str(TRAIN_SCRIPT)),
        *("--dataset", "digits", "--model", "mlp", "--image-size", "8", "--epochs", "2"),
        *("--data-dir", str(tmp_path / "data")),
    ]
    env = {**script_env(tmp_path, seeded=True), "PREFECT_API_URL": get_current_settings().api.url}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0's one run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("image-classifier").experiment_id])
    assert run.data.params["world_size"] == "2" and run.data.tags["train_on"] == "torchrun"
    for name in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name


ORPHANING = """
import sys
from pathlib import Path
from tasks.data.datasets import prepare_dataset
from tasks.data.digits import DigitsSource
from tasks.data.loaders import make_loaders
from tasks.data.source_base import Shape
from tasks.train.launch import train_local
from tasks.train.ranks import RankJob
from tasks.train.training import TrainSettings
from models import ModelSpec

folder = Path(sys.argv[1])
dataset = prepare_dataset(DigitsSource(), folder / "data", shape=Shape("1", (48, 48)))
spec = ModelSpec("cnn", 1, (48, 48), 10, dataset.mean, dataset.std)
settings = TrainSettings(50, "adamw", 1e-3, 0.0, "onecycle", 0)
job = RankJob(spec, settings, dataset, 64, 0.1, "none", "cpu", 1, 60, str(folder / "last.pt"))
train_local(job, 2, folder / "ranks", print)
"""


def test_ranks_end_themselves_when_the_process_that_started_them_is_killed(tmp_path):
    """SIGKILL leaves the launcher no chance to stop its ranks: each sees its parent gone and exits."""
    starter = subprocess.Popen([sys.executable, "-c", ORPHANING, str(tmp_path)])
    try:
        deadline, events = time.monotonic() + 120, tmp_path / "ranks" / "events.jsonl"
        while not (events.exists() and '"batch"' in events.read_text()):
            assert time.monotonic() < deadline and starter.poll() is None, "the ranks never trained"
            time.sleep(0.2)
        children = psutil.Process(starter.pid).children()
        ranks = [child for child in children if "tasks.train.ranks" in " ".join(child.cmdline())]
        assert len(ranks) == 2
        starter.kill()
        starter.wait()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(ranks, timeout=10)
        print(f"ranks gone {time.monotonic() - killed:.1f} s after their parent was killed")
        assert not alive
    finally:
        starter.kill()
        starter.wait()
