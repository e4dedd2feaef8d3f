"""Cancelling a flow run in Prefect stops the training this process runs for it."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling

from tasks.track import cancellation
from tasks.track.cancellation import CancelWatch, FlowRunCancelled, ended_status


@pytest.mark.slow
def test_the_watch_raises_once_the_flow_run_is_cancelling(prefect_server):
    seen = {}

    @flow
    def watched():
        watch, throttled = CancelWatch(interval=0), CancelWatch(interval=60)
        watch()  # running: goes on
        throttled()  # its first call asks at once
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        throttled()  # asked less than a minute ago: does not ask again
        with pytest.raises(FlowRunCancelled) as raised:
            watch()
        seen["message"] = str(raised.value)
        return Cancelled()

    state = watched(return_state=True)
    assert state.is_cancelled()
    assert (
        "was cancelled in Prefect" in seen["message"] and "retrying this flow run resumes" in seen["message"]
    )


@pytest.mark.slow
def test_a_task_watches_its_flow_run_and_the_default_interval_is_read_when_made(prefect_server, monkeypatch):
    """A sweep's trials are tasks, on this process's threads or a cluster's workers: they stop when
    the flow run they belong to is cancelled."""
    monkeypatch.setattr(cancellation, "CHECK_EVERY_SECONDS", 0)

    @task
    def trial():
        watch = CancelWatch()
        watch()
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        watch()

    @flow
    def sweep():
        with pytest.raises(FlowRunCancelled) as raised:
            trial()
        assert flow_run.id in str(raised.value)
        return Cancelled()

    assert sweep(return_state=True).is_cancelled()


def test_outside_a_flow_run_the_watch_does_nothing():
    watch = CancelWatch(interval=0)
    assert watch.flow_run_id is None
    watch()


def test_runs_told_to_stop_end_killed_and_others_failed():
    assert ended_status(FlowRunCancelled("x")) == "KILLED"
    assert ended_status(TerminationSignal(15)) == "KILLED"
    assert ended_status(KeyboardInterrupt()) == "KILLED"
    assert ended_status(RuntimeError("x")) == "FAILED"
