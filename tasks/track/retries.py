"""Prefect retry options for the steps that talk to MLflow (common/retrying.py holds the generic
retry conditions; these need the tracking stage's errors, so they live in it)."""

from __future__ import annotations

from common.files import OutputWriteError
from common.retrying import retry_except
from tasks.track.cancellation import FlowRunCancelled
from tasks.track.delivery import TrackingUnavailableError
from tasks.track.tracking import MLFLOW_RETRIES


def mlflow_retries(*never: type[BaseException]) -> dict:
    """Prefect task options for a step that talks to MLflow: tracking.MLFLOW_RETRIES' backoff for
    what may pass next time (a server restarting, a dropped connection), none for what a retry
    cannot fix: `never`, a write that failed on this machine (a full disk), a tracking server the
    run already waited out, and cancellation."""
    permanent = (*never, OutputWriteError, TrackingUnavailableError, FlowRunCancelled)
    return {**MLFLOW_RETRIES, "retry_condition_fn": retry_except(*permanent)}
