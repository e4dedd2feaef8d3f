"""Prefect retry conditions: retry what may pass next time, fail at once on what never will."""

from __future__ import annotations

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
