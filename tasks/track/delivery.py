"""Getting metrics to a tracking server that may be down: fail fast when it is unreachable at the
start, and keep training through an outage, delivering every epoch's metrics once it is back."""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.request
from typing import Mapping, Optional

import mlflow

from tasks.track import tracking

logger = logging.getLogger(__name__)
REACHABLE_WITHIN_SECONDS = 10.0


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (its lines reach the UI from any thread), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


class TrackingUnavailableError(ConnectionError):
    """The MLflow tracking server did not answer."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the MLflow server at `uri` answers its health check now."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def check_reachable(within: float = REACHABLE_WITHIN_SECONDS) -> None:
    """Raises TrackingUnavailableError, naming the URI, unless an HTTP tracking server answers
    within `within` seconds (MLflow's own retries would take minutes to give up); local stores
    pass at once."""
    uri = mlflow.get_tracking_uri()
    if not is_remote(uri):
        return
    deadline = time.monotonic() + within
    while not server_answers(uri):
        if time.monotonic() >= deadline:
            raise TrackingUnavailableError(
                f"the MLflow tracking server {uri} did not answer within {within:.0f} s; start it, or "
                "point MLFLOW_TRACKING_URI at one that runs (unset, runs go to sqlite:///mlflow.db)"
            )
        time.sleep(1)


class MetricsOutbox:
    """Delivers metric batches to a run in order from a background thread, so training never
    waits for the tracking server.

    A batch that cannot be delivered is retried, with the timestamp it was taken at (MLflow stores
    the same metric, step, value and timestamp once, so a retried request never doubles it),
    until the server has been unreachable for `patience` seconds; then `put` and `close` raise."""

    def __init__(self, run_id: str, patience: float) -> None:
        self.run_id, self.patience = run_id, patience
        self.uri = mlflow.get_tracking_uri()
        self.logger = _run_logger()
        self.error: Optional[TrackingUnavailableError] = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._deliver_all, name="MetricsOutbox", daemon=True)
        self._thread.start()

    def put(self, metrics: Mapping[str, float], step: int) -> None:
        """Queues one step's metrics; raises once the server has been away past patience."""
        if self.error:
            raise self.error
        self._queue.put((dict(metrics), step, tracking.now_ms()))

    def close(self) -> None:
        """Waits until everything queued is delivered (or patience runs out, which raises)."""
        self._queue.put(None)
        self._thread.join()
        if self.error:
            raise self.error

    def _deliver_all(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self.error is None:
                self._deliver(*batch)

    def _deliver(self, metrics: dict, step: int, timestamp: int) -> None:
        away_since, pause = None, 0.5
        while True:
            # Asked first: MLflow's own HTTP retries would hold one call for minutes.
            if not is_remote(self.uri) or server_answers(self.uri):
                try:
                    tracking.log_metrics(self.run_id, metrics, step=step, timestamp=timestamp)
                    if away_since is not None:
                        self.logger.warning("MLflow tracking server %s is back; metrics delivered", self.uri)
                    return
                except Exception as error:  # noqa: BLE001 - any failure to deliver is retried alike
                    reason = error
            else:
                reason = "no answer to its health check"
            now = time.monotonic()
            if away_since is None:
                away_since = now
                self.logger.warning(
                    "MLflow tracking server %s unreachable (%s); training goes on and its metrics "
                    "are sent when it is back (giving up after %.0f s)",
                    self.uri,
                    reason,
                    self.patience,
                )
            if now - away_since > self.patience:
                self.error = TrackingUnavailableError(
                    f"the MLflow tracking server {self.uri} was unreachable for more than "
                    f"{self.patience:.0f} s ({reason}); the checkpoint and outputs stay, and retrying "
                    "this flow run resumes from the last epoch"
                )
                return
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
