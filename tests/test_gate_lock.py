from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.publish import gate_lock
from tasks.publish.gate_lock import promotion_gate
from tasks.track.tracking import local_store
from tests.conftest import REPO, TRAIN_SCRIPT, Processes, free_port, script_env, wait_until_up


def test_local_store_is_the_file_or_folder_of_a_local_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_store("sqlite:///mlflow.db") == tmp_path / "mlflow.db"
    assert local_store(f"sqlite:///{tmp_path}/x/m.db") == tmp_path / "x" / "m.db"
    assert local_store("mlruns") == tmp_path / "mlruns"
    assert local_store(f"file://{tmp_path}/runs") == tmp_path / "runs"
    assert local_store("http://127.0.0.1:5000") is None
    assert local_store("postgresql://db.example/mlflow") is None


def hold_in_turn(monkeypatch, uri: str, name: str) -> list[str]:
    """Two threads take the gate; the second asks while the first holds it for 0.5 s."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    events: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with promotion_gate(name):
            events.append("first in")
            first_in.set()
            time.sleep(0.5)
            events.append("first out")

    def second() -> None:
        first_in.wait(30)
        with promotion_gate(name):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return events


def test_a_local_store_gate_is_a_file_lock_beside_the_store(tmp_path, monkeypatch):
    events = hold_in_turn(monkeypatch, f"sqlite:///{tmp_path}/mlflow.db", "it's/odd")
    assert events == ["first in", "first out", "second in"]
    assert (tmp_path / ".mlflow.db.promotion.lock").exists()


def test_a_remote_store_gate_is_a_prefect_global_concurrency_limit(prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client

    # The gate never calls the tracking server; a remote URI is all it reads.
    events = hold_in_turn(monkeypatch, "http://127.0.0.1:9", "remote-model")
    assert events == ["first in", "first out", "second in"]
    name = gate_lock.limit_name("remote-model")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots) == (1, 0)


def test_a_stuck_remote_gate_says_how_to_free_it(prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(gate_lock, "GATE_TIMEOUT_SECONDS", 1)
    name = f"stuck-{time.time_ns()}"
    with promotion_gate(name):  # creates the limit; then a dead holder keeps its only slot
        pass
    limit_name = gate_lock.limit_name(name)
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        client.update_global_concurrency_limit(limit_name, GlobalConcurrencyLimitUpdate(active_slots=1))
    with pytest.raises(gate_lock.GateBusyError, match=f"prefect gcl update {limit_name} --active-slots 0"):
        with promotion_gate(name):
            pass


def test_slugs_differ_for_names_that_read_alike():
    assert gate_lock._slug("a b") != gate_lock._slug("a_b")
    assert Path(gate_lock._slug("x" * 300)).name == gate_lock._slug("x" * 300)
    assert len(gate_lock._slug("x" * 300)) <= 73


def test_a_limit_with_two_slots_or_inactive_is_refused_naming_it_and_the_fix(prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    name = f"loose-{time.time_ns()}"
    limit = gate_lock.limit_name(name)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=2))
        fix = f"prefect gcl update {limit} --limit 1 --enable --slot-decay-per-second 0"
        with pytest.raises(
            gate_lock.GateMisconfiguredError, match=f"{limit}'?, which has 2 slots;"
        ) as refused:
            with promotion_gate(name):
                raise AssertionError("a gate of 2 slots let the run in")
        assert fix in str(refused.value)
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=1, active=False))
        with pytest.raises(gate_lock.GateMisconfiguredError, match="which is inactive;"):
            with promotion_gate(name):
                raise AssertionError("an inactive gate let the run in")
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active=True))
    with promotion_gate(name):  # as fixed
        pass


def test_a_tracking_server_gate_needs_the_teams_prefect_server(prefect_server, monkeypatch):
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")
    monkeypatch.setenv(gate_lock.TEMPORARY_API_VARIABLE, get_current_settings().api.url)
    with pytest.raises(gate_lock.PrefectNotSharedError, match="a temporary server this command started"):
        with promotion_gate("m"):
            raise AssertionError("a temporary Prefect server's lock let the run in")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(gate_lock.PrefectNotSharedError) as refused:
            gate_lock.require_shared_prefect()
    message = str(refused.value)
    assert "http://***@127.0.0.1:9" in message and "s3cret" not in message
    assert "no PREFECT_API_URL is set" in message and "PREFECT_API_AUTH_STRING" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # one machine: its file lock
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        gate_lock.require_shared_prefect()


def test_the_flow_refuses_before_any_work_on_a_temporary_prefect_server(
    prefect_server, tmp_path, monkeypatch
):
    from prefect.settings import get_current_settings

    from flows.config import TrainConfig
    from flows.train_flow import train_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked: refused first
    monkeypatch.setenv(gate_lock.TEMPORARY_API_VARIABLE, get_current_settings().api.url)
    config = TrainConfig(
        dataset="synthetic", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out")
    )
    with pytest.raises(gate_lock.PrefectNotSharedError):
        train_flow(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_the_lease_is_a_setting_within_what_prefect_accepts(monkeypatch):
    assert gate_lock.lease_seconds() == gate_lock.GATE_LEASE_SECONDS
    monkeypatch.setenv(gate_lock.LEASE_VARIABLE, "90")
    assert gate_lock.lease_seconds() == 90
    for bad in ("5", "soon", "nan"):
        monkeypatch.setenv(gate_lock.LEASE_VARIABLE, bad)
        with pytest.raises(
            gate_lock.GateMisconfiguredError, match=f"PIC_GATE_LEASE_SECONDS='{bad}'.*60 to 86400"
        ):
            gate_lock.lease_seconds()


@pytest.mark.slow
def test_two_runs_against_one_tracking_server_without_a_shared_prefect_are_refused(tmp_path):
    port = free_port()
    processes = Processes(tmp_path, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        server, log = processes.start(
            "mlflow",
            *("mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"),
            *("--artifacts-destination", str(tmp_path / "artifacts")),
        )
        wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
        started = time.monotonic()
        runs = []
        for index in (1, 2):  # two users' machines: folders of their own, a temporary Prefect each
            (tmp_path / f"user{index}").mkdir()
            env = {**script_env(tmp_path / f"user{index}"), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
            flags = ("--dataset", "synthetic", "--epochs", "1", "--registered-model", "raced")
            runs.append(
                subprocess.Popen(
                    [sys.executable, str(TRAIN_SCRIPT), *flags, "--seed", str(index)],
                    cwd=tmp_path / f"user{index}",
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [run.communicate(timeout=120) for run in runs]
        elapsed = time.monotonic() - started
        client = MlflowClient(f"http://127.0.0.1:{port}")
        assert client.search_registered_models() == []
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    finally:
        processes.stop_all()
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 1, out[-2000:] + err[-3000:]
        [line] = [line for line in err.splitlines() if line.startswith("error:")]
        assert f"the MLflow tracking store http://127.0.0.1:{port} is a server" in line
        assert "no PREFECT_API_URL is set" in line and "Set PREFECT_API_URL" in line
        assert "Traceback" not in err
    assert elapsed < 30


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_frees_the_gate_within_its_lease(tmp_path):
    """A real `prefect server start` (the session's test server runs no repossessor service), its
    repossessor looking for expired leases every second; the shortest lease Prefect accepts."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    off = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "TRIGGERS")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        **{f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false" for service in off},
    }
    processes = Processes(tmp_path, env, grace=3)  # a throwaway server: no need to wait on its shutdown
    holder_env = {
        **env,
        "PREFECT_API_URL": api,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # a tracking server: the gate never calls it
        gate_lock.LEASE_VARIABLE: "60",
    }
    # The holder imports while the server starts, then takes the gate as soon as the server answers.
    holder = f"""
import time, urllib.request
import mlflow, prefect.client.orchestration, tasks.files
from tasks.publish.gate_lock import promotion_gate
while True:
    try:
        urllib.request.urlopen("{api}/health", timeout=2)
        break
    except OSError:
        time.sleep(0.2)
with promotion_gate("killed"):
    print("held", flush=True)
    time.sleep(600)
"""
    try:
        server, log = processes.start(
            "prefect", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)
        )
        process = subprocess.Popen(
            [sys.executable, "-c", holder],
            cwd=REPO,
            env=holder_env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        processes.started.append(process)  # stopped with the server if the test fails early
        wait_until_up(f"{api}/health", server, log)
        watchdog = threading.Timer(120, process.kill)  # a holder that never gets in fails the test
        watchdog.start()
        held = process.stdout.readline()
        watchdog.cancel()
        assert held == "held\n", log.read_text()[-3000:]
        assert active_slots(api, "killed") == 1
        process.kill()
        process.wait()
        killed_at = time.monotonic()
        while active_slots(api, "killed") and time.monotonic() - killed_at < 90:
            time.sleep(0.5)
        freed_after = time.monotonic() - killed_at
    finally:
        processes.stop_all()
    assert 30 < freed_after < 60 + 10, freed_after  # by the lease's expiry, not before, not long after


def active_slots(api: str, name: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(gate_lock.limit_name(name)).active_slots
