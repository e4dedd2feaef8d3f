"""The one seam to MLflow's, Prefect's and torch's internals: every private name the project relies
on is used here (and only here), with the public API it lacks and the version it was checked on.

`check_internals()` resolves each one and raises CompatError naming the library, its installed
version, the name and what it was for; tests/test_compat.py runs it on the installed versions, so an
upgrade that drops a name fails there, first. At use, what only saves time goes without a name that
is gone (the package-scan skip; the server variables, not checked at use); the rest raise the same
CompatError, and system metrics then warn and let the run go on without them. Nothing here imports
the project, nor any library at import time (flows/api_server.py imports this before Prefect).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, NamedTuple


class CompatError(RuntimeError):
    """An installed library no longer has an internal name this project relies on."""


class Internal(NamedTuple):
    """A private name of MLflow, Prefect or torch: where it lives, what for, what public API is missing."""

    library: str
    owner: str  # the dotted module or class holding the name, or the function whose source reads it
    name: str
    purpose: str
    missing: str  # the public API that would replace it
    checked: str  # the version it was checked on; pyproject.toml caps the library below its next minor
    in_source: bool = False  # an environment variable or instance attribute, looked up in owner's source

    def error(self) -> CompatError:
        installed = _version(self.library)
        where = f"{self.name} in {self.owner}" if self.in_source else f"{self.owner}.{self.name}"
        major, minor = self.checked.split(".")[:2]
        return CompatError(
            f"{self.library} {installed} no longer has {where} (used to {self.purpose}; checked on "
            f"{self.library} {self.checked}); pin {self.library}<{major}.{int(minor) + 1} or update "
            "common/compat.py"
        )

    def resolve(self) -> Any:
        """The named object (the owner, for a name read in its source); CompatError when it is gone."""
        import inspect  # here, not at import time: flows/api_server.py imports this module first

        try:
            owner = _import(self.owner)
            if not self.in_source:
                return getattr(owner, self.name)
            if self.name not in inspect.getsource(owner):
                raise AttributeError(self.name)
            return owner
        except (ModuleNotFoundError, AttributeError, OSError, TypeError) as error:
            raise self.error() from error


def _import(dotted: str) -> Any:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or not (module + ".").startswith(error.name + "."):
                # The module is there but one of its own imports is not: not a name that is gone.
                raise ImportError(f"{module} is installed but cannot be imported: {error}") from error
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ModuleNotFoundError(dotted, name=parts[0])


def _version(library: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


PACKAGE_SCAN = Internal(
    "mlflow",
    "mlflow.utils.requirements_utils",
    "_MODULES_TO_PACKAGES",
    "skip MLflow's scan of every installed package when it saves or loads a model",
    missing="no option to check a model's requirements without mapping every package to modules",
    checked="3.17.2",
)
MONITOR = Internal(
    "mlflow",
    "mlflow.system_metrics.system_metrics_monitor",
    "SystemMetricsMonitor",
    "record system/* metrics of a run opened through MlflowClient",
    missing="system metrics only via mlflow.start_run(log_system_metrics=True), the thread's fluent run",
    checked="3.17.2",
)
MONITOR_LOGGER = Internal(
    "mlflow",
    "mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor.__init__",
    "self.mlflow_logger",
    "flush the system metrics sample taken when a block ends",
    missing="no public way to log a last sample after SystemMetricsMonitor.finish()",
    checked="3.17.2",
    in_source=True,
)
SERVER_EPHEMERAL = Internal(
    "prefect",
    "prefect.server.api.server.create_app",
    "PREFECT__SERVER_EPHEMERAL",
    "give the early temporary server the services of Prefect's own temporary server",
    missing="no public setting for create_app(ephemeral=True) in a uvicorn child",
    checked="3.9.1",
    in_source=True,
)
SERVER_FINAL = Internal(
    "prefect",
    "prefect.server.api.server.create_app",
    "PREFECT__SERVER_FINAL",
    "let the early temporary server build its app once, as Prefect's own temporary server does",
    missing="no public setting for create_app(final=True) in a uvicorn child",
    checked="3.9.1",
    in_source=True,
)
TEMPORARY_SERVER = Internal(
    "prefect",
    "prefect.server.api.server",
    "SubprocessASGIServer",
    "start Prefect's temporary API server up front, for local cluster workers to report to",
    missing="no public way to start Prefect's temporary server outside a flow run and get its URL",
    checked="3.9.1",
)
INTERNALS = (PACKAGE_SCAN, MONITOR, MONITOR_LOGGER, SERVER_EPHEMERAL, SERVER_FINAL, TEMPORARY_SERVER)


def check_internals() -> None:
    """Resolves every internal name above; one CompatError listing each that is gone."""
    problems = []
    for internal in INTERNALS:
        try:
            internal.resolve()
        except CompatError as error:
            problems.append(str(error))
    if problems:
        raise CompatError("\n".join(problems))


def skip_mlflow_package_scan() -> None:
    """Empties MLflow's module-to-package map before its first use, which only a distribution without
    metadata needs (pip gives every one metadata): the same requirements check, about 1 s sooner.
    Only a speed-up, so skipped when the map is gone (the seam's test still fails)."""
    with contextlib.suppress(CompatError):
        if PACKAGE_SCAN.resolve() is None:  # None until MLflow first builds it
            setattr(_import(PACKAGE_SCAN.owner), PACKAGE_SCAN.name, {})


def monitor_system_metrics(run_id: str, interval: float) -> Any:
    """MLflow's monitor of a run's system/* metrics, continuing the run's steps (not started)."""
    return MONITOR.resolve()(run_id, sampling_interval=interval, resume_logging=True)


def log_last_system_metrics(monitor: Any) -> None:
    """Stops the monitor, then takes and logs one more sample, so that a short block leaves one."""
    try:
        logger = monitor.mlflow_logger  # publish_metrics only queues a sample in it
    except AttributeError as error:
        raise MONITOR_LOGGER.error() from error
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    logger.flush()


def temporary_server_env() -> dict[str, str]:
    """The environment Prefect gives its own temporary server's child. Not checked at use, which
    would import Prefect's server where the early start avoids it; without it a full server runs."""
    return {SERVER_EPHEMERAL.name: "1", SERVER_FINAL.name: "1"}


def start_temporary_server() -> str:
    """Starts Prefect's own temporary API server in a child process (stopped when this process
    exits) and returns its API URL; CompatError when Prefect no longer has the class."""
    server = TEMPORARY_SERVER.resolve()()
    server.start()
    return server.api_url
