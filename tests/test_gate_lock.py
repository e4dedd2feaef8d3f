from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tasks.publish import gate_lock
from tasks.publish.gate_lock import promotion_gate
from tasks.track.tracking import local_store


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
    name = f"champion-gate-{gate_lock._slug('remote-model')}"
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
    limit_name = f"champion-gate-{gate_lock._slug(name)}"
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
