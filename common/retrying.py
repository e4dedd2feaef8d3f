"""Prefect retry conditions: retry what may pass next time, fail at once on what never will."""

from __future__ import annotations

import time
from typing import Callable, Optional


def _raised(state) -> Optional[BaseException]:
    try:
        state.result()
    except BaseException as error:  # classified by the callers, never swallowed
        return error
    return None


def retry_on(*errors: type[BaseException]) -> Callable:
    """A retry_condition_fn that retries only these exception types."""
    return lambda task, task_run, state: isinstance(_raised(state), errors)


def retry_except(*errors: type[BaseException]) -> Callable:
    """A retry_condition_fn that retries anything but these exception types."""
    return lambda task, task_run, state: not isinstance(_raised(state), errors)


def attempt_stable_ms() -> int:
    """When this task run was created, in ms since the epoch: the same for each of its retries, so
    metrics a retry logs again carry the timestamp of the first attempt's and MLflow stores them
    once. The current time outside a task run."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    created = context.task_run.created if context and context.task_run else None
    return int(created.timestamp() * 1000) if created else int(time.time() * 1000)
