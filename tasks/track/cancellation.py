"""Stopping training and sweeps when their flow run is cancelled in Prefect, and the MLflow status
that says so.

A worker stops a cancelled flow run it started by sending its process SIGTERM, which Prefect turns
into TerminationSignal. A run started from the command line (`python flows/train_flow.py`) has no
worker: cancelling it in the UI, with `prefect flow-run cancel` or through the API only marks it
CANCELLING, and CancelWatch is what stops it. Prefect still runs the tasks of a CANCELLING flow
run (their states are client-side), so a sweep's trials check too, wherever they run.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from prefect.client.orchestration import get_client
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

logger = logging.getLogger(__name__)
CHECK_EVERY_SECONDS = 2.0


class FlowRunCancelled(Exception):
    """The flow run this process runs was cancelled in Prefect."""


def ended_status(error: BaseException) -> str:
    """The MLflow run status for a run that `error` ended: KILLED when it was told to stop
    (cancelled in Prefect, SIGTERM, Ctrl-C), else FAILED."""
    stopped = isinstance(error, (FlowRunCancelled, TerminationSignal, KeyboardInterrupt))
    return "KILLED" if stopped else "FAILED"


class CancelWatch:
    """Called as often as one likes (the training loop calls it after every step): at most every
    `interval` seconds (default CHECK_EVERY_SECONDS) it reads the state of the flow run it was made
    in (from a task: the task's flow run) and raises FlowRunCancelled once it is CANCELLING or
    CANCELLED. Outside a flow run it does nothing; an API error is logged and the next check tries
    again (losing the API must not stop training)."""

    def __init__(self, interval: Optional[float] = None) -> None:
        self.flow_run_id: Optional[str] = flow_run.id
        self.name = flow_run.name if self.flow_run_id else None
        self.interval = CHECK_EVERY_SECONDS if interval is None else interval
        self.checked = -float("inf")

    def __call__(self, *_: object) -> None:
        if self.flow_run_id is None or time.monotonic() - self.checked < self.interval:
            return
        self.checked = time.monotonic()
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.flow_run_id).state
        except Exception as error:  # noqa: BLE001 - checked again in `interval` seconds
            logger.warning("could not read the flow run's state to check for cancellation: %s", error)
            return
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            raise FlowRunCancelled(
                f"flow run {self.name} ({self.flow_run_id}) was cancelled in Prefect; the "
                "checkpoint of the last whole epoch stays, and retrying this flow run resumes from it"
            )
