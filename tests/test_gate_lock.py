from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest

from tasks.publish import gate_lock
from tasks.publish.gate_lock import promotion_gate
from tasks.track.tracking import local_store
from tests.conftest import TRAIN_SCRIPT, raw_server, script_env


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


@pytest.mark.slow
def test_a_remote_store_gate_is_a_prefect_global_concurrency_limit(prefect_server, monkeypatch):
    from prefect.client.orchestration import get_client

    # The gate never calls the tracking server; a remote URI is all it reads.
    events = hold_in_turn(monkeypatch, "http://127.0.0.1:9", "remote-model")
    assert events == ["first in", "first out", "second in"]
    name = gate_lock.limit_name("remote-model")
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active_slots) == (1, 0)


@pytest.mark.slow
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


def test_the_gate_of_a_plain_name_is_champion_gate_and_the_name():
    assert gate_lock.limit_name("digits-cnn") == "champion-gate-digits-cnn"
    assert gate_lock.limit_name("Photos_v2.1~b") == "champion-gate-Photos_v2.1~b"
    assert gate_lock.limit_name("x" * 251) == "champion-gate-" + "x" * 251  # the longest name: whole


def test_other_names_get_a_hash_stay_apart_and_are_limit_names_prefect_takes():
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    names = ["a b", "a_b", "a?b", "a#b", "a%b", "a&b", "a<b>", "été", "it's", "a b" + "x" * 248]
    limits = [gate_lock.limit_name(name) for name in names]
    digest = hashlib.sha256(b"a b").hexdigest()[:8]
    assert limits[:2] == [f"champion-gate-a_b-{digest}", "champion-gate-a_b"]
    assert len(set(limits)) == len(names)
    for limit in limits:
        assert GlobalConcurrencyLimitCreate(name=limit, limit=1).name == limit  # Prefect's own check
        assert quote(limit, safe="") == limit  # the client sends it in a URL path unquoted


@pytest.mark.slow
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


def test_a_tracking_server_gate_needs_the_teams_prefect_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # the run on Prefect's temporary server
        with pytest.raises(gate_lock.PrefectNotSharedError) as refused:
            gate_lock.require_shared_prefect()
    message = str(refused.value)
    assert "http://***@127.0.0.1:9" in message and "s3cret" not in message
    assert "no PREFECT_API_URL is set" in message and "PREFECT_API_AUTH_STRING" in message
    with temporary_settings({PREFECT_API_URL: "http://prefect.example:4200/api"}):  # the team's
        gate_lock.require_shared_prefect()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # one machine: its file lock
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        gate_lock.require_shared_prefect()


def test_the_flow_refuses_before_any_work_without_a_prefect_server(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import TrainConfig
    from flows.train_flow import train_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # never asked: refused first
    config = TrainConfig(
        dataset="synthetic", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out")
    )
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(gate_lock.PrefectNotSharedError):
            train_flow.fn(config)  # the flow's body, as its run would start it
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
def test_a_run_against_a_tracking_server_without_a_shared_prefect_is_refused_before_any_work(tmp_path):
    """A user's machine: its own folder, Prefect's temporary server, a tracking server of the team's
    (here one that answers every request and notes its path)."""
    asked: list[str] = []

    def answer(handler) -> None:
        asked.append(handler.path.split("?")[0])
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"{}")

    with raw_server(answer) as uri:
        env = {**script_env(tmp_path, seeded=True), "MLFLOW_TRACKING_URI": uri}
        flags = ("--dataset", "synthetic", "--epochs", "1", "--registered-model", "raced")
        run = subprocess.run(
            [sys.executable, str(TRAIN_SCRIPT), *flags],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
    [line] = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert f"the MLflow tracking store {uri} is a server" in line
    assert "no PREFECT_API_URL is set" in line and "Set PREFECT_API_URL" in line
    assert "Traceback" not in run.stderr
    # Refused as the flow starts, on its Prefect temporary server: MLflow was asked only the command
    # line's checks (is it up, does it take this login), and no data or run folder was made.
    assert "Starting temporary server" in run.stderr
    assert set(asked) == {"/health", "/api/2.0/mlflow/experiments/search"}
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


# A run SIGKILLed in the gate: tests/test_team_deployment.py, on the team stack's Prefect server.
