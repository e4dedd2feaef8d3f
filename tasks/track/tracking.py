"""MLflow run bookkeeping through MlflowClient and an explicit run id (Prefect tasks run in threads)."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from common import compat
from common.files import file_lock, write_error
from common.redaction import redact_params, without_credentials

_MAX_BATCH = 1000  # MLflow's log_batch limit for metrics
# Prefect retry settings for tasks that mostly talk to MLflow. Each request also has MLflow's own
# HTTP retries with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR).
MLFLOW_RETRIES = dict(retries=3, retry_delay_seconds=[2, 5, 10], retry_jitter_factor=0.5)
_REPO_ROOT = Path(__file__).resolve().parents[2]  # tasks/track/tracking.py -> the checkout


_created: set[Path] = set()  # the SQLite stores this process has created or found created


def get_client() -> MlflowClient:
    """A client on MLFLOW_TRACKING_URI, or MLflow's default local SQLite store (sqlite:///mlflow.db)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and (store := local_store(uri)) not in _created:
        _create_sqlite_store(uri, store)
        _created.add(store)
    return MlflowClient()


def _create_sqlite_store(uri: str, store: Path) -> None:
    # MLflow creates a new SQLite store's tables and runs its migrations when a process first opens
    # it, without a lock: runs started at once on a new store break each other's migrations ("table
    # experiments already exists"). They take turns here, through a file lock beside the store.
    with file_lock(store.with_name(f".{store.name}.create.lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the registry's


def skip_package_scan() -> None:
    """Call before saving or loading an MLflow model: the same requirements check, about 1 s sooner."""
    # MLflow checks a model's pinned requirements against the installed versions, by distribution
    # name, after mapping every installed package to its modules (reading each one's RECORD: about
    # 1 s), which only a distribution without metadata needs. The map is MLflow's private cache
    # (common/compat.py): if it is renamed, the scan comes back and nothing else changes.
    compat.skip_mlflow_package_scan()


def local_store(uri: str) -> Optional[Path]:
    """The file or folder a local tracking URI stores runs in; None for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme.startswith("sqlite"):
        return Path(uri.split(":///", 1)[1]).resolve()
    if parsed.scheme in ("", "file"):
        return Path(parsed.path).resolve()
    return None


def tracking_uri() -> str:
    """This process's tracking URI, with a relative SQLite path made absolute, for other processes."""
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def web_url(*parts: str) -> Optional[str]:
    """A page of the MLflow UI (`#/experiments/1/runs/<id>`), when the tracking server speaks HTTP;
    without the URI's credentials, as links end up in model cards and Prefect artifacts."""
    uri = without_credentials(tracking_uri())
    return f"{uri.rstrip('/')}/#/" + "/".join(parts) if uri.startswith(("http://", "https://")) else None


def use_tracking_uri(uri: str) -> None:
    """Points a worker process at the flow's tracking store (a no-op in the flow's own process)."""
    if tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)


def start_run(experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Creates the experiment if needed and opens a run in it; returns the run id."""
    client = get_client()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id


def finish_run(run_id: str, status: str) -> None:
    """Marks the run FINISHED, FAILED or KILLED."""
    get_client().set_terminated(run_id, status)


def log_params(run_id: str, params: Mapping[str, object]) -> None:
    """Logs params as strings (None as empty), in one batch; URLs without their credentials."""
    batch = [Param(key, "" if value is None else str(value)) for key, value in redact_params(params).items()]
    get_client().log_batch(run_id, params=batch)


def log_tags(run_id: str, tags: Mapping[str, object]) -> None:
    """Sets tags on the run."""
    get_client().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_metrics(
    run_id: str,
    metrics: Mapping[str, float],
    step: int = 0,
    model_id: Optional[str] = None,
    timestamp: Optional[int] = None,
) -> None:
    """Logs metrics at one step (of the logged model `model_id` too, if given), in batches MLflow
    accepts. The same values at the same timestamp are stored once in the run's history."""
    timestamp = timestamp or now_ms()
    batch = [Metric(key, float(value), timestamp, step, model_id=model_id) for key, value in metrics.items()]
    client = get_client()
    for start in range(0, len(batch), _MAX_BATCH):
        client.log_batch(run_id, metrics=batch[start : start + _MAX_BATCH])


def now_ms() -> int:
    return int(time.time() * 1000)


def log_artifacts(run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
    """Uploads files to the run's artefact store. A local store that cannot take a file (disk full)
    raises OutputWriteError naming the file and its destination; MLflow leaves no partial copy."""
    client = get_client()
    for path in paths:
        try:
            client.log_artifact(run_id, str(path), artifact_path)
        except OSError as error:
            artifact_uri = client.get_run(run_id).info.artifact_uri
            if urlparse(artifact_uri).scheme not in ("", "file"):
                raise  # HTTP stores: connection errors are OSErrors too, and not about our disk
            folder = Path(local_path(artifact_uri), artifact_path or "")
            raise write_error(folder / Path(path).name, error, source=path) from error


def local_path(uri: str) -> str:
    """The path of a local artefact location: a file: URI's path, or the location itself."""
    return url2pathname(urlparse(uri).path if uri.startswith("file:") else uri)


def git_tags(repo: Path = _REPO_ROOT) -> dict[str, str]:
    """The code's git commit (and whether the tree was dirty), when it runs from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    shown = compat.reserved_tag(compat.GIT_COMMIT_TAG)  # where MLflow's UI shows a run's source version
    return {shown: commit, "git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def find_run(experiment: str, flow_run_id: str) -> Optional[str]:
    """The run an earlier attempt of this Prefect flow run opened, if any."""
    found = get_client().get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = get_client().search_runs(
        [found.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def find_child_run(parent_run_id: str, trial: int) -> Optional[str]:
    """The run of trial `trial` under a sweep's parent run, if one was started."""
    return _find_child_run(_experiment_of(parent_run_id), parent_run_id, trial)


def _experiment_of(run_id: str) -> str:
    return get_client().get_run(run_id).info.experiment_id


def _find_child_run(experiment_id: str, parent_run_id: str, trial: int) -> Optional[str]:
    parent = compat.reserved_tag(compat.PARENT_RUN_TAG)
    runs = get_client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{parent}` = '{parent_run_id}' and tags.`sweep.trial` = '{trial}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_child_run(
    parent_run_id: str, trial: int, run_name: str, tags: Mapping[str, str], params: Mapping[str, object]
) -> str:
    """Starts trial `trial`'s child run, or reopens the one an earlier attempt started; logs its
    tags and params (the same values again on a retry, which MLflow accepts)."""
    client = get_client()
    experiment_id = _experiment_of(parent_run_id)
    run_id = _find_child_run(experiment_id, parent_run_id, trial)
    if run_id is None:
        # MLflow's parent tag nests the trial under the sweep's run in its UI.
        identity = {compat.reserved_tag(compat.PARENT_RUN_TAG): parent_run_id, "sweep.trial": str(trial)}
        run_id = client.create_run(experiment_id, run_name=run_name, tags=identity).info.run_id
    else:
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    log_tags(run_id, tags)
    log_params(run_id, params)
    return run_id


def log_missing_steps(run_id: str, history: list[dict[str, float]]) -> None:
    """Logs each epoch's metrics (step = epoch, from 1) that the run does not hold yet."""
    client = get_client()
    for name in history[0] if history else ():
        logged = {metric.step for metric in client.get_metric_history(run_id, name)}
        for epoch, metrics in enumerate(history, 1):
            if epoch not in logged:
                log_metrics(run_id, {name: metrics[name]}, step=epoch)


@contextmanager
def system_metrics(run_id: str, enabled: bool = True, interval: float = 5.0) -> Iterator[None]:
    """Records CPU, memory, disk, network (and GPU, with pynvml) usage as the run's system/* metrics
    while the block runs, through MLflow's SystemMetricsMonitor (MLFLOW_SYSTEM_METRICS_* env vars
    override the interval). A last sample is taken at the end, so a short block still leaves one."""
    if not enabled:
        yield
        return
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop chatter
    try:
        monitor = compat.monitor_system_metrics(run_id, interval)
    except compat.CompatError as error:  # system metrics never fail a run; tests/test_compat.py fails
        logging.getLogger(__name__).warning("system metrics not recorded: %s", error)
        monitor = None
    if monitor is None:
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        # Best effort, and bounded: with the tracking server away, the monitor's thread sits in
        # MLflow's HTTP retries for minutes, and neither training nor the run should wait on it.
        stopping = threading.Thread(target=_stop_monitor, args=(monitor,), daemon=True)
        stopping.start()
        stopping.join(_MONITOR_STOP_SECONDS)
        if stopping.is_alive():
            logging.getLogger(__name__).warning(
                "system metrics did not stop within %d s (tracking server away?); the last samples "
                "may be missing",
                _MONITOR_STOP_SECONDS,
            )


_MONITOR_STOP_SECONDS = 10


def _stop_monitor(monitor) -> None:
    try:
        compat.log_last_system_metrics(monitor)
    except Exception as error:  # noqa: BLE001 - system metrics never fail a run
        logging.getLogger(__name__).warning("system metrics: last sample not logged (%s)", error)
