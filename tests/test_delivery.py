from __future__ import annotations

import time

import pytest
from conftest import free_port
from mlflow import MlflowClient

from tasks.track import delivery, tracking
from tasks.track.delivery import MetricsOutbox, TrackingUnavailableError, check_reachable


def test_an_unreachable_server_is_named_within_the_bound(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"{uri} did not answer within 2 s"):
        check_reachable(within=2)
    assert time.monotonic() - started < 6


def test_a_local_store_is_always_reachable(mlflow_store):
    started = time.monotonic()
    check_reachable()
    assert time.monotonic() - started < 1


def flaky_log_metrics(monkeypatch, failures: int) -> list[int]:
    """tracking.log_metrics that fails `failures` times first; returns the steps it was asked for."""
    real, asked = tracking.log_metrics, []

    def flaky(run_id, metrics, step=0, **kwargs):
        asked.append(step)
        if len(asked) <= failures:
            raise ConnectionError("simulated outage")
        real(run_id, metrics, step=step, **kwargs)

    monkeypatch.setattr(tracking, "log_metrics", flaky)
    return asked


def test_metrics_wait_out_an_outage_and_arrive_once_in_order(mlflow_store, monkeypatch):
    run_id = tracking.start_run("outbox", "run", {})
    asked = flaky_log_metrics(monkeypatch, failures=2)
    outbox = MetricsOutbox(run_id, patience=30)
    started = time.monotonic()
    for step in (1, 2, 3):
        outbox.put({"loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 0.5  # training never waited
    outbox.close()
    assert asked == [1, 1, 1, 2, 3]
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]


def test_an_outage_past_patience_stops_the_run_with_a_clear_error(mlflow_store, monkeypatch):
    run_id = tracking.start_run("outbox", "run", {})
    flaky_log_metrics(monkeypatch, failures=10**6)
    outbox = MetricsOutbox(run_id, patience=1)
    outbox.put({"loss": 1.0}, step=1)
    with pytest.raises(TrackingUnavailableError, match="unreachable for more than 1 s"):
        outbox.close()
    with pytest.raises(TrackingUnavailableError, match="retrying this flow run resumes"):
        outbox.put({"loss": 0.5}, step=2)
    assert MlflowClient().get_metric_history(run_id, "loss") == []


def test_the_health_check_is_asked_before_each_attempt(monkeypatch):
    answers = iter([False, False, True])
    monkeypatch.setattr(delivery, "server_answers", lambda uri: next(answers))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    check_reachable(within=10)  # answered at the third ask
