"""The one seam to the internals of MLflow, Prefect, torch, Pillow, Dask and Ray: every module path,
name, attribute or reserved tag outside a library's public API (tests/public_api.py says what is
public: documented modules, their __all__) is used here, and only here, each with the public API it
lacks and the version it was checked on. tests/test_compat.py scans the rest of the source for any.

`check_internals()` resolves each one and raises CompatError naming the library, its installed
version, the name and what it was for; tests/test_compat.py runs it on the installed versions, so an
upgrade that drops a name fails there, first. At use, what only saves time goes without a name that
is gone (the package-scan skip); the rest raise the same CompatError, and system metrics and the
wait for a sent event then warn and let the run go on. Nothing here imports the project, nor any
library at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import threading
from typing import Any, NamedTuple


class CompatError(RuntimeError):
    """An installed library no longer has an internal name this project relies on."""


class Internal(NamedTuple):
    """An internal of a library: where it lives, what for, what public API is missing."""

    library: str  # the distribution, as pyproject.toml names it
    owner: str  # the dotted module or class holding the name, or the function whose source reads it
    name: str
    purpose: str
    missing: str  # the public API that would replace it
    checked: str  # the version it was checked on; pyproject.toml caps the library below its next minor
    in_source: bool = False  # an environment variable or instance attribute, looked up in owner's source

    @property
    def path(self) -> str:
        return f"{self.owner}.{self.name}"

    def error(self) -> CompatError:
        installed = _version(self.library)
        where = f"{self.name} in {self.owner}" if self.in_source else self.path
        major, minor = self.checked.split(".")[:2]
        return CompatError(
            f"{self.library} {installed} no longer has {where} (used to {self.purpose}; checked on "
            f"{self.library} {self.checked}); pin {self.library}<{major}.{int(minor) + 1} or update "
            "common/compat.py"
        )

    def resolve(self) -> Any:
        """The named object (the owner, for a name read in its source); CompatError when it is gone."""
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


def _mlflow_tag(name: str, purpose: str, missing: str) -> Internal:
    """One of MLflow's reserved tags (keys that start with `mlflow.`), by MLflow's name for its key."""
    return Internal("mlflow", "mlflow.utils.mlflow_tags", name, purpose, missing, checked="3.17.2")


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
MODEL_VERSIONS_TAG = _mlflow_tag(
    "MLFLOW_MODEL_VERSIONS",
    "link a logged model to the registered version made from it",
    missing="MlflowClient.create_model_version(model_id=...) links them only on a tracking server; on a "
    "local store only mlflow.register_model does, on the process's global tracking URI",
)
DATASET_CONTEXT_TAG = _mlflow_tag(
    "MLFLOW_DATASET_CONTEXT",
    "tag a run's dataset inputs with their context (training, validation, test)",
    missing="no public key for MlflowClient.log_inputs' InputTag; mlflow.log_input(context=) needs the "
    "thread's active run",
)
GIT_COMMIT_TAG = _mlflow_tag(
    "MLFLOW_GIT_COMMIT",
    "show a run's git commit where MLflow's UI shows a run's source version",
    missing="MlflowClient.create_run sets no source tags; mlflow.start_run does, for the thread's active run",
)
PARENT_RUN_TAG = _mlflow_tag(
    "MLFLOW_PARENT_RUN_ID",
    "nest a sweep trial's run under the sweep's run, and find it there again",
    missing="MlflowClient.create_run takes no parent; mlflow.start_run(parent_run_id=...) needs the "
    "thread's active run",
)
SOURCE_TYPE = Internal(
    "mlflow",
    "mlflow.data.dataset_source.DatasetSource",
    "_get_source_type",
    "name a dataset source's type in the dataset inputs a run logs",
    missing="no public type name: only Dataset.to_dict() gives it, and a Dataset subclass must override "
    "the private _compute_digest",
    checked="3.17.2",
)
LOCAL_SOURCE = Internal(
    "mlflow",
    "mlflow.data.dataset_source_registry",
    "get_dataset_source_from_json",
    "describe a local file as a dataset's source",
    missing="no public dataset source for a local file (mlflow.data documents HTTP, Delta, Spark and "
    "Hugging Face ones)",
    checked="3.17.2",
)
CODE_SOURCE = Internal(
    "mlflow",
    "mlflow.data.code_dataset_source",
    "CodeDatasetSource",
    "describe generated data by the function that generates it",
    missing="no public dataset source for data that code generates",
    checked="3.17.2",
)
PICKLE_MODULE = Internal(
    "mlflow",
    "mlflow.pytorch",
    "pickle_module",
    "recognise the pickle module MLflow's PyTorch flavor names in the MLmodel files it writes",
    missing="MLmodel's pickle_module_name names a module of MLflow's, with no public constant for it",
    checked="3.17.2",
)
EVENTS_WAIT = Internal(
    "prefect",
    "prefect.events.worker.EventsWorker",
    "wait_until_empty",
    "wait until the process's events worker has sent the events emitted so far",
    missing="emit_event() only queues an event, sent in the background; no public flush or wait",
    checked="3.9.1",
)
PNG_TILE = Internal(
    "pillow",
    "PIL.ImageFile.ImageFile.__init__",
    "self.tile",
    "decode all 16 bits of PNG colour, by changing the raw mode Pillow's PNG decoder unpacks with",
    missing="no 16-bit colour mode: Pillow opens 16-bit RGB(A) PNGs as 8-bit, keeping the top bytes",
    checked="13.0.0",
    in_source=True,
)
ELASTIC_LOGGER = Internal(
    "torch",
    "torch.distributed.elastic.multiprocessing.api",
    "logger",
    "quiet the elastic launcher's warning, when started from a thread, that it cannot catch signals to "
    "stop its ranks (each rank ends itself once its parent is gone)",
    missing="no LaunchConfig setting to leave the signal handlers out",
    checked="2.14.1",
)

INTERNALS = (
    PACKAGE_SCAN,
    MONITOR,
    MONITOR_LOGGER,
    MODEL_VERSIONS_TAG,
    DATASET_CONTEXT_TAG,
    GIT_COMMIT_TAG,
    PARENT_RUN_TAG,
    SOURCE_TYPE,
    LOCAL_SOURCE,
    CODE_SOURCE,
    PICKLE_MODULE,
    EVENTS_WAIT,
    PNG_TILE,
    ELASTIC_LOGGER,
)


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


def quiet_elastic_launcher() -> None:
    """Leaves only the errors of torch's elastic launcher in the log (which rank failed, and how)."""
    with contextlib.suppress(CompatError):  # only a quieter log
        ELASTIC_LOGGER.resolve().setLevel(logging.ERROR)


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


def reserved_tag(tag: Internal) -> str:
    """The key of one of MLflow's reserved tags above (`mlflow.parentRunId`, ...)."""
    return tag.resolve()


def dataset_source_type(source: Any) -> str:
    """The type MLflow records for a dataset source (`http`, `local`, `code`)."""
    try:
        return source._get_source_type()
    except AttributeError as error:
        raise SOURCE_TYPE.error() from error


def local_dataset_source(uri: str) -> Any:
    """MLflow's dataset source for a local file (`uri`: a path or a file: URI)."""
    return LOCAL_SOURCE.resolve()(json.dumps({"uri": uri}), "local")


def code_dataset_source(tags: dict[str, str]) -> Any:
    """MLflow's dataset source for data that code generates, described by `tags`."""
    return CODE_SOURCE.resolve()(tags)


def wait_for_events(seconds: float) -> bool:
    """Waits until Prefect's events worker has sent the events this process emitted, `seconds` at
    most; whether it did."""
    wait = EVENTS_WAIT.resolve()
    try:
        worker = _import(EVENTS_WAIT.owner).instance()  # the process's worker, as emit_event uses
    except AttributeError as error:
        raise EVENTS_WAIT.error() from error
    waiter = threading.Thread(target=wait, args=(worker,), daemon=True)
    waiter.start()
    waiter.join(seconds)
    return not waiter.is_alive()


def png_raw_mode(image: Any) -> str:
    """The raw mode Pillow's decoder will unpack an opened (not yet loaded) PNG's pixels with."""
    try:
        return image.tile[0].args
    except (AttributeError, IndexError, TypeError) as error:
        raise PNG_TILE.error() from error


def set_png_raw_mode(image: Any, raw_mode: str) -> None:
    """Has Pillow unpack an opened (not yet loaded) PNG's pixels with `raw_mode`, which must take as
    many bits per pixel as the one it replaces."""
    image.tile = [image.tile[0]._replace(args=raw_mode)]
