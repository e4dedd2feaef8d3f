import importlib
import threading
import time

import pytest
from prefect import flow, task
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows import runners
from flows.runners import RunnerUnavailableError, make_task_runner, submit_all


def test_runner_kinds_and_their_limits():
    threads = make_task_runner("threads", None, 3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    assert make_task_runner("threads", None, None)._max_workers >= 1  # bounded, unlike Prefect's default
    assert isinstance(make_task_runner("processes", None, 2), ProcessPoolTaskRunner)
    local_dask = make_task_runner("dask", None, 2)
    assert (
        local_dask.cluster_kwargs["n_workers"] == 2 and local_dask.cluster_kwargs["threads_per_worker"] == 1
    )
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert make_task_runner("dask", "tcp://127.0.0.1:8786", None).address == "tcp://127.0.0.1:8786"
        assert make_task_runner("ray", "ray://127.0.0.1:10001", None).address == "ray://127.0.0.1:10001"
    with pytest.raises(ValueError, match="unknown task runner 'mpi'"):
        make_task_runner("mpi", None, None)


def test_a_missing_extra_says_what_to_install(monkeypatch):
    real = importlib.import_module

    def without_ray(name, *args):
        if name == "prefect_ray":
            raise ImportError("No module named 'prefect_ray'")
        return real(name, *args)

    monkeypatch.setattr(runners.importlib, "import_module", without_ray)
    with pytest.raises(RunnerUnavailableError, match=r"needs prefect-ray: pip install -e '\.\[ray\]'"):
        make_task_runner("ray", None, None)


def test_an_existing_cluster_needs_a_prefect_server_its_workers_reach():
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(RunnerUnavailableError, match="set PREFECT_API_URL to an address the workers"):
            make_task_runner("dask", "tcp://10.1.2.3:8786", None)
    with temporary_settings({PREFECT_API_URL: "http://10.1.2.3:4200/api"}):
        assert make_task_runner("dask", "tcp://10.1.2.3:8786", None).address == "tcp://10.1.2.3:8786"


@pytest.mark.slow
def test_submit_all_keeps_at_most_limit_running_and_returns_futures_in_order(prefect_server):
    lock, running, peak = threading.Lock(), [0], [0]

    @task
    def work(index: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return index

    @flow
    def many() -> list[int]:
        with make_task_runner("threads", None, 8) as runner:
            futures = submit_all(runner, work, [{"index": i} for i in range(6)], limit=2)
            return [future.result() for future in futures]

    assert many() == list(range(6))
    assert peak[0] == 2
