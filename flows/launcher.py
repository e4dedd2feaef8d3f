"""Runs a flow script's command line (flows/train_flow.py, sweep_flow.py, predict_flow.py): the
flags parsed once, the servers and the settings checked once, then the heavy imports, then the run.

The order is for speed and for safety. Bad flags and servers that do not answer are reported
before anything starts. Prefect's temporary API server (flows/api_server.py) is a child process:
started next, it comes up while this process imports torch, Prefect and MLflow (about 8 s on two
cores) and then opens the MLflow store. Both happen in this one thread: importing MLflow's SQL
store configures every SQLAlchemy mapper in the process, and one configured while another thread
was halfway through importing Prefect's server models killed a run ("expression 'WorkQueue'
failed to locate a name"). No library is imported or initialised in a background thread here.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, NoReturn, Optional

from flows import api_server
from flows.cli import (
    USER_ERRORS,
    exit_unless_gate_shared,
    exit_unless_hardware_fits,
    exit_unless_prefect_answers,
    exit_unless_tracking_answers,
    exit_unless_trials_fit,
    exit_unless_weights_available,
    parse_config,
    parse_sweep_config,
    short_user_errors,
)
from flows.config import PredictConfig

Check = Callable[[Any], None]  # given the parsed config; exits with a one-line `error: ...`


@dataclass(frozen=True)
class Script:
    """A flow script's command line: the module that runs it (imported once the checks pass; it
    has `main(config)` and `USER_ERRORS`), how its flags parse, and its own checks: `first` ones
    before the temporary Prefect server starts, `beside` ones (they import torch) while it starts."""

    module: str
    parse: Callable[[Optional[list[str]]], Any]
    first: tuple[Check, ...] = ()
    beside: tuple[Check, ...] = ()


def _gate_shared(config: Any) -> None:
    exit_unless_gate_shared()  # as the flow does first, but before its imports


TRAIN = Script(
    "flows.train_flow",
    parse_config,
    first=(exit_unless_weights_available,),  # before the server: missing weights leave no files behind
    beside=(exit_unless_hardware_fits, _gate_shared),
)
SWEEP = Script("flows.sweep_flow", parse_sweep_config, beside=(exit_unless_trials_fit, _gate_shared))
PREDICT = Script(
    "flows.predict_flow",
    partial(parse_config, config_class=PredictConfig, prog="python flows/predict_flow.py"),
)


def run_script(script: Script) -> NoReturn:
    """`python flows/SCRIPT.py FLAGS`: launches the flow on the command line's flags, then exits
    (the script's own body, which the launch imported as a module, does not run again)."""
    try:
        launch(script, sys.argv[1:])
    finally:
        # Exit without a last collection over every object torch, MLflow and Prefect made (~4 s).
        gc.freeze()
    sys.exit(0)


def launch(script: Script, argv: Optional[list[str]] = None) -> dict:
    """Parses `argv`, checks, starts the temporary Prefect server, imports the script's module and
    runs its `main(config)` on that server; the module's USER_ERRORS exit with `error: MESSAGE`."""
    # The temporary server's telemetry heartbeat races its own SQLite writes and logs
    # "database is locked" tracebacks; it has nothing to do with the run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with _no_collection_while_importing():
        config = script.parse(argv)  # --help and bad flags answer here, before anything starts
        exit_unless_tracking_answers()
        exit_unless_prefect_answers()
        for check in script.first:
            check(config)
        server = api_server.start()  # a child process: it comes up while this one imports below
        for check in script.beside:
            check(config)
        module = importlib.import_module(script.module)
        from tasks.track import steps  # imported with the module

        steps.tracking_checked()  # it answered above: the run's open-mlflow-run step does not ask again
        open_tracking_store()
    errors = USER_ERRORS
    try:
        with api_server.use(server), short_user_errors(errors):
            return module.main(config)
    except errors as error:
        sys.exit(f"error: {error}")


@contextmanager
def _no_collection_while_importing() -> Iterator[None]:
    """Imports make millions of objects and next to no garbage, yet the cyclic collector runs over
    them again and again as they grow: 1-2 s of CPU before a run starts. It is off until they are
    done; then what they made is frozen (never scanned again) and it is on again for the run."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def open_tracking_store() -> None:
    """Opens the MLflow store in this thread, after the imports and while the temporary server may
    still be starting (1-1.5 s for a SQLite store: MLflow's SQL modules and its schema check)."""
    from tasks.track import tracking

    # Any error is the run's own open-mlflow-run step's to report, after its retries.
    with suppress(Exception):
        tracking.get_client()
