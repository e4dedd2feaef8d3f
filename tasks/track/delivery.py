"""Getting metrics to a tracking server that may be down: fail fast when it is unreachable at the
start, and keep training through an outage, delivering every epoch's metrics once it is back."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Mapping, Optional
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.environment_variables import (
    MLFLOW_TRACKING_CLIENT_CERT_PATH,
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from common.errors import UserError
from common.redaction import redact_url, without_credentials
from tasks.track import tracking

logger = logging.getLogger(__name__)
REACHABLE_WITHIN_SECONDS = 10.0


def run_logger(fallback: logging.Logger = logger) -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger (its lines reach the UI from any thread), else `fallback`."""
    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


class TrackingUnavailableError(UserError, ConnectionError):
    """The MLflow tracking server did not answer."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def tls_options() -> dict[str, object]:
    """How MLflow's own client verifies the server, as `requests` arguments: the CA bundle in
    MLFLOW_TRACKING_SERVER_CERT_PATH, none with MLFLOW_TRACKING_INSECURE_TLS, and the client
    certificate in MLFLOW_TRACKING_CLIENT_CERT_PATH."""
    insecure, bundle = MLFLOW_TRACKING_INSECURE_TLS.get(), MLFLOW_TRACKING_SERVER_CERT_PATH.get()
    if insecure and bundle:
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_INSECURE_TLS is set and so is MLFLOW_TRACKING_SERVER_CERT_PATH ({bundle}); "
            "unset one: the first turns verification off, the second verifies against that CA bundle"
        )
    return {"verify": bundle or not insecure, "cert": MLFLOW_TRACKING_CLIENT_CERT_PATH.get()}


def server_answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the MLflow server at `uri` answers its health check now (which needs no login, so
    the URI's credentials stay off this request), over TLS verified as MLflow's client would."""
    try:
        options = tls_options()
        url = without_credentials(uri).rstrip("/") + "/health"
        return requests.get(url, timeout=timeout, **options).status_code == 200
    except (requests.RequestException, OSError, ValueError):  # a bad CA file is an OSError
        return False


def check_reachable(within: float = REACHABLE_WITHIN_SECONDS) -> None:
    """Raises TrackingUnavailableError, naming the URI (less its credentials), unless an HTTP
    tracking server answers within `within` seconds (MLflow's own retries would take minutes to give
    up) and takes this client's login; local stores pass at once."""
    uri = mlflow.get_tracking_uri()
    if not is_remote(uri):
        return
    check_well_formed(uri)
    tls_options()  # contradictory TLS settings are an error now, not a server that never answers
    deadline = time.monotonic() + within
    while not server_answers(uri):
        if time.monotonic() >= deadline:
            raise TrackingUnavailableError(
                f"the MLflow tracking server {redact_url(uri)} did not answer within {within:.0f} s; "
                "start it, or point MLFLOW_TRACKING_URI at one that runs (unset, runs go to "
                "sqlite:///mlflow.db)"
            )
        time.sleep(1)
    check_login(uri)


def check_login(uri: str) -> None:
    """Raises TrackingUnavailableError, naming the server (never the password), when it refuses
    this client's credentials: MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN or the
    URI's own `user:password@`. A server without authentication lets every request through."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        response = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",  # any request that needs a login
            params={"max_results": 1},
            auth=(user, password or "") if user else None,
            headers={"Authorization": f"Bearer {token}"} if token and not user else None,
            timeout=REACHABLE_WITHIN_SECONDS,
            **tls_options(),
        )
    except requests.RequestException:
        return  # it answered its health check a moment ago; the run's own requests will retry
    if response.status_code in (401, 403):
        given = "MLFLOW_TRACKING_USERNAME/PASSWORD" if user else "MLFLOW_TRACKING_TOKEN" if token else None
        raise TrackingUnavailableError(
            f"the MLflow tracking server {redact_url(uri)} refused "
            f"{'the login in ' + given if given else 'a client without a login'} "
            f"(HTTP {response.status_code}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "to an account of that server"
        )


def check_well_formed(uri: str) -> None:
    """Raises TrackingUnavailableError, naming the URI less its credentials, unless it has a host
    and a numeric port (or none)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as error:
        reason = str(error).replace(uri, redact_url(uri))
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {redact_url(uri)} is not a valid URL ({reason}); give "
            "http(s)://[USER:PASSWORD@]HOST[:PORT][/PATH]"
        ) from None
    if not parts.hostname:
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI {redact_url(uri)} names no host; give http(s)://HOST[:PORT][/PATH]"
        )


class MetricsOutbox:
    """Delivers metric batches to a run in order from a background thread, so training never
    waits for the tracking server.

    A batch that cannot be delivered is retried, with the timestamp it was taken at (MLflow stores
    the same metric, step, value and timestamp once, so a retried request never doubles it),
    until the server has been unreachable for `patience` seconds; then `put` and `close` raise."""

    def __init__(self, run_id: str, patience: float) -> None:
        self.run_id, self.patience = run_id, patience
        self.uri = mlflow.get_tracking_uri()
        self.shown_uri = redact_url(self.uri)
        self.logger = run_logger()
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
                        self.logger.warning(
                            "MLflow tracking server %s is back; metrics delivered", self.shown_uri
                        )
                    return
                except Exception as error:  # noqa: BLE001 - any failure to deliver is retried alike
                    # MLflow's messages quote the request's URL, credentials included.
                    reason = str(error).replace(self.uri.rstrip("/"), self.shown_uri.rstrip("/"))
            else:
                reason = "no answer to its health check"
            now = time.monotonic()
            if away_since is None:
                away_since = now
                self.logger.warning(
                    "MLflow tracking server %s unreachable (%s); training goes on and its metrics "
                    "are sent when it is back (giving up after %.0f s)",
                    self.shown_uri,
                    reason,
                    self.patience,
                )
            if now - away_since > self.patience:
                self.error = TrackingUnavailableError(
                    f"the MLflow tracking server {self.shown_uri} was unreachable for more than "
                    f"{self.patience:.0f} s ({reason}); the checkpoint and outputs stay, and retrying "
                    "this flow run resumes from the last epoch"
                )
                return
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
