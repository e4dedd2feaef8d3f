"""Where a flow's parallel tasks run: Prefect's thread or process pool, or a Dask or Ray cluster."""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from common.errors import UserError
from flows.config import RunnerName


class RunnerUnavailableError(UserError, RuntimeError):
    """The chosen task runner's package is not installed."""


def _runner_class(module: str, name: str, extra: str) -> type[TaskRunner]:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise RunnerUnavailableError(
            f"--task-runner {extra} needs {module.replace('_', '-')}: pip install -e '.[{extra}]'"
        ) from error


def make_task_runner(kind: RunnerName, address: Optional[str], max_parallel: Optional[int]) -> TaskRunner:
    """The runner for `kind`, to enter with `running`; without an address, Dask and Ray start a
    local cluster that stops with the runner. An existing cluster's workers report their task runs to
    a Prefect server they reach, so an address without PREFECT_API_URL is refused."""
    if address and not PREFECT_API_URL.value():
        raise RunnerUnavailableError(
            f"--address {address}: the cluster's workers report task runs to a Prefect server; "
            "start one (prefect server start --host 0.0.0.0) and set PREFECT_API_URL to an address the "
            "workers can reach, e.g. prefect config set PREFECT_API_URL=http://HOST:4200/api"
        )
    cores = os.cpu_count() or 1
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_parallel or cores)  # Prefect's default: no limit
    if kind == "processes":
        workers = max_parallel or cores
        # A share of the cores each: torch's default, all of them in every process, thrashes.
        threads = max(1, cores // workers)
        return ProcessPoolTaskRunner(
            max_workers=workers, initializer=torch.set_num_threads, initargs=(threads,)
        )
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


@contextmanager
def running(runner: TaskRunner) -> Iterator[TaskRunner]:
    """Enters `runner` in a flow run, its task runs reporting to the flow run's Prefect API. On
    Prefect's temporary server (no PREFECT_API_URL) its address goes with them in their settings:
    worker processes would otherwise each start a temporary server of their own."""
    if PREFECT_API_URL.value():
        with runner:
            yield runner
        return
    with get_client(sync_client=True) as client:  # the flow run's own client
        api_url = str(client.api_url)
    with temporary_settings({PREFECT_API_URL: api_url}), runner:
        yield runner


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
