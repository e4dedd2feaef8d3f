"""Where a flow's parallel tasks run: Prefect's thread or process pool, or a Dask or Ray cluster."""

from __future__ import annotations

import importlib
from typing import Any, Literal, Optional

from prefect import Task
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

RunnerName = Literal["threads", "processes", "dask", "ray"]
ADDRESS_PATTERN = r"^((tcp|tls)://\S+:\d+|ray://\S+:\d+|auto)$"


class RunnerUnavailableError(RuntimeError):
    """The chosen task runner's package is not installed."""


def _runner_class(module: str, name: str, extra: str) -> type[TaskRunner]:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise RunnerUnavailableError(
            f"--task-runner {extra} needs {module.replace('_', '-')}: pip install -e '.[{extra}]'"
        ) from error


def make_task_runner(kind: RunnerName, address: Optional[str], max_parallel: Optional[int]) -> TaskRunner:
    """The runner for `kind`, to use as a context manager; without an address, Dask and Ray start a
    local cluster that stops with the runner."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_parallel)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=max_parallel)
    if kind == "dask":
        runner = _runner_class("prefect_dask", "DaskTaskRunner", "dask")
        if address:
            return runner(address=address)
        # One thread per worker process: each trial or partition keeps torch's own threads busy.
        workers = {"n_workers": max_parallel} if max_parallel else {}
        return runner(cluster_kwargs={"threads_per_worker": 1, "processes": True, **workers})
    if kind == "ray":
        runner = _runner_class("prefect_ray", "RayTaskRunner", "ray")
        if address:
            return runner(address=address)
        return runner(init_kwargs={"num_cpus": max_parallel} if max_parallel else {})
    raise ValueError(f"unknown task runner {kind!r}; choose threads, processes, dask or ray")


def submit_all(
    runner: TaskRunner, task: Task, calls: list[dict[str, Any]], limit: Optional[int]
) -> list[PrefectFuture]:
    """Submits one task run per parameter dict, at most `limit` running at once; futures in call order."""
    futures: list[PrefectFuture] = []
    running: list[PrefectFuture] = []
    for parameters in calls:
        if limit and len(running) >= limit:
            running.remove(next(as_completed(running)))
        future = runner.submit(task, parameters)
        futures.append(future)
        running.append(future)
    return futures
