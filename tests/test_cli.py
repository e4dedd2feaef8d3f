"""The flow scripts' command lines (flows/cli.py and each script's `main`): bad flags, hardware and
servers refused in one line before any work, user errors without tracebacks, and the scripts run
plainly, by path, as `python flows/SCRIPT.py` and as deployments' entrypoints."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TRAIN_SCRIPT, free_port, raw_server, script_env
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from flows import cli, predict_flow, sweep_flow, train_flow
from flows.config import PredictConfig, TrainConfig
from flows.sweep_config import SweepConfig
from tasks.predict.image_inputs import PredictionError
from tasks.track.delivery import TrackingUnavailableError

NO_FP16 = "precision 'fp16' needs a CUDA device, and this run trains on cpu"
PUBLISHED = {
    "test_accuracy": 0.5,
    "versions": {"m": "1"},
    "alias": "champion",
    "reason": "first",
    "run_dir": "r",
}
# What each flow returns, as much as its script prints.
OUTCOMES = {
    "train_flow": PUBLISHED,
    "sweep_flow": {**PUBLISHED, "trials": [{}, {}], "best_trial": 2, "best_settings": {"lr": 0.2}},
    "predict_flow": {"model_uri": "models:/m-onnx@champion", "model_version": "1", "predictions": "p.csv"},
}


@pytest.fixture
def flows_never_start(monkeypatch) -> list[str]:
    """The scripts' server checks and flows, recorded instead of run."""
    started: list[str] = []

    def recorded(name: str):
        return lambda config: started.append(name) or OUTCOMES[name]

    for module in (train_flow, sweep_flow, predict_flow):
        name = module.__name__.rpartition(".")[2]
        monkeypatch.setattr(module, name, recorded(name))
        monkeypatch.setattr(module, "prepare_servers", lambda: started.append("servers"))
    return started


def test_a_user_error_exits_with_its_one_line_and_others_propagate():
    with pytest.raises(SystemExit) as exited:
        with cli.user_errors_exit():
            raise PredictionError("no such image folder 'x'")
    assert exited.value.code == "error: no such image folder 'x'"  # printed; the exit status is 1
    with pytest.raises(RuntimeError, match="a real bug"):
        with cli.user_errors_exit():
            raise RuntimeError("a real bug")


@pytest.mark.parametrize(
    "run, message",
    [
        (
            lambda: train_flow.main(TrainConfig(dataset="synthetic", device="cuda")),
            "device 'cuda' was requested",
        ),
        (lambda: train_flow.main(TrainConfig(dataset="synthetic", device="cpu", precision="fp16")), NO_FP16),
        (
            lambda: sweep_flow.main(
                SweepConfig(base=TrainConfig(device="cpu", precision="fp16"), grid={"lr": [0.1, 0.2]})
            ),
            NO_FP16,
        ),
    ],
)
def test_hardware_the_machine_lacks_is_refused_before_any_work(
    run, message, flows_never_start, tmp_path, monkeypatch
):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run()
    assert str(exited.value.code).startswith(f"error: {message}")
    assert flows_never_start == []  # no server asked or started, no flow
    assert list(tmp_path.iterdir()) == []  # no data, no outputs


def test_trials_on_a_cluster_are_not_judged_by_this_machines_hardware(flows_never_start, capsys):
    config = SweepConfig(
        base=TrainConfig(device="cuda"), grid={"lr": [0.1, 0.2]}, task_runner="dask", address="tcp://h:8786"
    )
    assert sweep_flow.main(config) == OUTCOMES["sweep_flow"]
    assert flows_never_start == ["servers", "sweep_flow"]
    assert capsys.readouterr().out.startswith("best of 2 trials: 2 {'lr': 0.2}, test accuracy 0.5000;")


def test_the_servers_are_checked_before_the_flow_and_an_unreachable_one_is_named(monkeypatch):
    started = []
    monkeypatch.setattr(train_flow, "train_flow", lambda config: started.append("flow"))

    def unreachable(within: float = 10.0) -> None:
        raise TrackingUnavailableError("the MLflow tracking server http://***@127.0.0.1:9 did not answer")

    monkeypatch.setattr(cli, "check_reachable", unreachable)
    with pytest.raises(SystemExit) as exited:
        train_flow.main(TrainConfig(dataset="synthetic", device="cpu"))
    assert exited.value.code == "error: the MLflow tracking server http://***@127.0.0.1:9 did not answer"
    assert started == []


def prefect_login_server(handler) -> None:
    """Prefect's API with PREFECT_SERVER_API_AUTH_STRING=admin:right: 401 without it."""
    right = "Basic " + base64.b64encode(b"admin:right").decode()
    handler.send_response(200 if handler.headers.get("Authorization") == right else 401)
    handler.send_header("Content-Length", "3")
    handler.end_headers()
    handler.wfile.write(b'"3"')


@pytest.mark.parametrize("auth", ["admin:right", "admin:wr0ng", None])
def test_a_prefect_server_that_refuses_the_auth_string_is_named_at_once(auth):
    with raw_server(prefect_login_server) as url:
        settings = {PREFECT_API_URL: f"{url}/api", PREFECT_API_AUTH_STRING: auth}
        with temporary_settings(settings):
            if auth == "admin:right":
                cli.exit_unless_prefect_answers(within=2)
                return
            with pytest.raises(SystemExit) as refused:
                cli.exit_unless_prefect_answers(within=2)
    given = "PREFECT_API_AUTH_STRING" if auth else "a client without PREFECT_API_AUTH_STRING"
    assert refused.value.code == f"error: the Prefect server {url}/api refused {given} (HTTP 401)"
    assert "wr0ng" not in refused.value.code


def test_a_prefect_server_that_does_not_answer_is_named_within_the_bound_without_its_credentials():
    port = free_port()
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: f"http://alice:s3cret@127.0.0.1:{port}/api"}):
        with pytest.raises(SystemExit) as exited:
            cli.exit_unless_prefect_answers(within=1)
    assert time.monotonic() - started < 5
    message = str(exited.value.code)
    named = f"error: the Prefect server http://***@127.0.0.1:{port}/api (PREFECT_API_URL) did not answer"
    assert message.startswith(named) and "within 1 s (ConnectError" in message and "s3cret" not in message


def test_without_a_prefect_server_the_temporary_ones_telemetry_is_off_unless_set(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        cli.prepare_servers()  # the default local store and Prefect's temporary server: nothing to ask
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        cli.prepare_servers()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


def test_each_script_checks_the_servers_then_runs_its_flow_and_prints_one_line(flows_never_start, capsys):
    assert train_flow.main(TrainConfig(dataset="synthetic", device="cpu")) == OUTCOMES["train_flow"]
    assert (
        predict_flow.main(PredictConfig(registered_model="m", dataset="digits")) == OUTCOMES["predict_flow"]
    )
    assert flows_never_start == ["servers", "train_flow", "servers", "predict_flow"]
    assert capsys.readouterr().out.splitlines() == [
        "test accuracy 0.5000; versions {'m': '1'} -> champion (first); outputs in r",
        "models:/m-onnx@champion (version 1): predictions in p.csv",
    ]


def test_each_deployments_entrypoint_loads_by_path(monkeypatch):
    """As a worker loads a deployment's flow: the file by its path, from the checkout's root."""
    monkeypatch.chdir(REPO)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    entrypoints = {deployment["entrypoint"] for deployment in deployments}
    assert entrypoints == {
        "flows/train_flow.py:train_flow",
        "flows/sweep_flow.py:sweep_flow",
        "flows/predict_flow.py:predict_flow",
    }
    names = {load_flow_from_entrypoint(entry, use_placeholder_flow=False).name for entry in entrypoints}
    assert names == {"train-image-classifier", "sweep-image-classifier", "predict-images"}


def run_script(cwd: Path, script: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "flows" / script), *flags]
    return subprocess.run(command, cwd=cwd, env=script_env(cwd), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, flags, named",
    [
        (
            "sweep_flow.py",
            ["--grid", "dataset=digits,mnist"],
            "--grid dataset: not a setting a trial can vary",
        ),
        ("predict_flow.py", ["--image-dir", "photos"], "--registered-model"),
    ],
)
def test_bad_flags_answer_with_a_one_line_error_before_any_work(script, flags, named, tmp_path):
    result = run_script(tmp_path, script, *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr
    # No Prefect database (importing Prefect makes its home folder, empty), MLflow store or outputs.
    assert [path for path in tmp_path.rglob("*") if not path.is_dir()] == []


# Runs train_flow.py as `python flows/train_flow.py FLAGS` would, recording each thread that
# configures SQLAlchemy's mappers (MLflow's SQL store does as it opens).
MAPPERS_PROBE = """
import atexit, json, runpy, sys, threading
import sqlalchemy.orm

calls, configure = [], sqlalchemy.orm.configure_mappers

def recorded():
    calls.append(threading.current_thread().name)
    return configure()

sqlalchemy.orm.configure_mappers = recorded
atexit.register(lambda: open({out!r}, "w").write(json.dumps(calls)))
sys.argv = [{script!r}, *{flags!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_script_runs_on_prefects_temporary_server_with_the_mlflow_store_opened_in_the_main_thread(
    tmp_path,
):
    """`python flows/train_flow.py` end to end on Prefect's own temporary server, and without the
    race that once killed a run: MLflow's store opened in a thread while the main one imported
    Prefect's server models configured them half-defined ("'WorkQueue' failed to locate")."""
    out = tmp_path / "mappers.json"
    flags = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--no-system-metrics"]
    program = MAPPERS_PROBE.format(out=str(out), script=str(TRAIN_SCRIPT), flags=flags)
    result = run_program(program, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout and "-> champion" in result.stdout
    assert list((tmp_path / "outputs").iterdir()) and (tmp_path / "data" / "prepared").is_dir()
    assert "Starting temporary server" in result.stderr  # Prefect's own: no PREFECT_API_URL
    calls = json.loads(out.read_text())
    assert calls and set(calls) == {"MainThread"}, calls


# A flow whose task runs go to a process pool, run as a command line runs it: no PREFECT_API_URL.
POOL_PROGRAM = """
import json, os
from prefect import flow, task
from prefect.settings import PREFECT_API_URL
from flows.runners import make_task_runner, running, submit_all

@task
def report(index: int) -> list:
    return [os.getpid(), PREFECT_API_URL.value()]

@flow
def pooled() -> list:
    runner = make_task_runner("processes", None, 2)
    with running(runner):
        return [future.result() for future in submit_all(runner, report, [{"index": i} for i in range(3)], 2)]

print(json.dumps({"pid": os.getpid(), "api_url": PREFECT_API_URL.value(), "workers": pooled()}))
"""


@pytest.mark.slow
def test_a_local_pools_workers_report_to_the_flows_temporary_server(tmp_path):
    result = run_program(POOL_PROGRAM, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Starting temporary server") == 1  # the flow's, not one per worker
    server = result.stderr.split("Starting temporary server on ")[1].split()[0]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["api_url"] is None  # the command line's own settings name no server
    assert {url for _, url in printed["workers"]} == {f"{server}/api/"}
    assert printed["pid"] not in {pid for pid, _ in printed["workers"]}


def run_program(program: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """`python -c PROGRAM` in `cwd`, as a user's shell there runs it: seeded stores, no Prefect server."""
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        env=script_env(cwd, seeded=True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
