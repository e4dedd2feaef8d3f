"""Command lines generated from the flows' configs: one flag per field, errors that name the value."""

from __future__ import annotations

import argparse
import base64
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator, Literal, Optional, TypeVar, get_args, get_origin

from prefect.exceptions import CancelledRun
from pydantic import BaseModel, ValidationError

from common.errors import UserError
from flows.config import TrainConfig
from flows.sweep_config import SearchRange, SweepConfig, sweepable_choices

Config = TypeVar("Config", bound=BaseModel)
_SWEEP_OWN = ("grid", "space")
# Failures a user can act on: the command lines print their message instead of a traceback.
USER_ERRORS = (UserError, CancelledRun)  # flags with a syntax of their own; SweepConfig's others are generated


def build_parser(config_class: type[BaseModel], prog: str) -> argparse.ArgumentParser:
    """One flag per config field, with its description, choices and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=config_class.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_fields(parser, config_class)
    return parser


def add_fields(parser: argparse._ActionsContainer, config_class: type[BaseModel], skip: tuple = ()) -> None:
    """Adds a flag for each field of `config_class` not in `skip`."""
    for name, field in config_class.model_fields.items():
        if name in skip:
            continue
        flag, default = "--" + name.replace("_", "-"), None if field.is_required() else field.default
        if field.annotation is bool:  # --flag / --no-flag
            parser.add_argument(
                flag,
                dest=name,
                default=default,
                action=argparse.BooleanOptionalAction,
                help=field.description,
            )
            continue
        choices = _literal_choices(field.annotation)
        parser.add_argument(
            flag,
            dest=name,
            default=default,
            required=field.is_required(),
            choices=choices,
            help=field.description,
            metavar=None if choices else name.upper(),
        )


def _literal_choices(annotation: object) -> Optional[tuple[str, ...]]:
    """The strings of a Literal (also inside Optional), for argparse's choices."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return args
    inner = [arg for arg in args if arg is not type(None)]
    return _literal_choices(inner[0]) if len(inner) == 1 else None


def parse_config(
    argv: Optional[list[str]] = None,
    config_class: type[Config] = TrainConfig,
    prog: str = "python flows/train_flow.py",
) -> Config:
    """Parses flags into a validated config; exits with status 2 naming any bad value."""
    parser = build_parser(config_class, prog)
    return _validate(parser, config_class, vars(parser.parse_args(argv)))


def parse_sweep_config(
    argv: Optional[list[str]] = None, prog: str = "python flows/sweep_flow.py"
) -> SweepConfig:
    """train_flow's flags set the base config; --grid, --random and --space say what varies."""
    parser = build_parser(TrainConfig, prog)
    parser.description = SweepConfig.__doc__
    sweep = parser.add_argument_group("sweep", f"Settings a trial can vary: {sweepable_choices()}.")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="Values to try for a setting (repeatable); the trials are the product of all grids.",
    )
    sweep.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="FIELD=LOW:HIGH[:log]",
        help="A range for random search (repeatable), drawn --random N times; ':log' for log-uniform.",
    )
    add_fields(sweep, SweepConfig, skip=("base", *_SWEEP_OWN))
    values = vars(parser.parse_args(argv))
    own = {name: values.pop(name) for name in SweepConfig.model_fields if name in values}
    base = _validate(parser, TrainConfig, {name: values[name] for name in TrainConfig.model_fields})
    grid = dict(_assignment(parser, "--grid", item) for item in own["grid"])
    space = dict(_assignment(parser, "--space", item) for item in own["space"])
    fields = {
        **own,
        "base": base,
        "grid": {name: text.split(",") for name, text in grid.items()},
        "space": {name: _search_range(parser, name, text) for name, text in space.items()},
    }
    return _validate(parser, SweepConfig, fields)


def exit_unless_hardware_fits(config: TrainConfig) -> None:
    """A device this machine lacks, or fp16 without CUDA, is a bad flag: exits with a one-line
    error before any work (imports torch, which the run needs anyway)."""
    from tasks.train.speed import PrecisionUnavailableError, resolve_precision
    from tasks.train.training import DeviceUnavailableError, resolve_device

    try:
        resolve_precision(config.precision, resolve_device(config.device))
    except (DeviceUnavailableError, PrecisionUnavailableError) as error:
        sys.exit(f"error: {error}")


def exit_unless_weights_available(config: TrainConfig) -> None:
    """--weights imagenet that is neither cached nor downloadable is an error now, before any data
    work, naming the file and the folder to put it in."""
    if config.weights != "imagenet":
        return
    from models import PretrainedWeightsUnavailable, pretrained_file

    try:
        pretrained_file(config.model)
    except PretrainedWeightsUnavailable as error:
        sys.exit(f"error: {error}")


def exit_unless_tracking_answers() -> None:
    """An HTTP tracking server that does not answer within 10 s is an error now, before any work
    (MLflow's own retries would take minutes to give up)."""
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return  # a local store, nothing to wait for: MLflow (1.5 s to import) is not needed yet
    from tasks.track.delivery import TrackingUnavailableError, check_reachable

    try:
        check_reachable()
    except TrackingUnavailableError as error:
        sys.exit(f"error: {error}")


def exit_unless_gate_shared() -> None:
    """A run against a tracking server whose champion gate would lock on a Prefect server of its own
    (no PREFECT_API_URL) is an error now: runs on other machines would not see the lock."""
    from tasks.publish.gate_lock import PrefectNotSharedError, require_shared_prefect

    try:
        require_shared_prefect()
    except PrefectNotSharedError as error:
        sys.exit(f"error: {error}")


def exit_unless_prefect_answers(within: float = 10.0) -> None:
    """A Prefect server named in PREFECT_API_URL that does not answer within `within` seconds, or
    refuses PREFECT_API_AUTH_STRING, is an error now, naming the server (never the auth string)."""
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return  # a temporary local server (or one the active profile names: Prefect reports that)
    from common.redaction import redact_url

    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    request = urllib.request.Request(url + "/admin/version", headers=headers)  # needs the auth string
    deadline = time.monotonic() + within
    while True:
        try:
            urllib.request.urlopen(request, timeout=2, context=_prefect_tls()).close()
            return
        except urllib.error.HTTPError as error:
            if error.code not in (401, 403):
                return  # it answers; anything else is for the run's own requests to report
            given = "PREFECT_API_AUTH_STRING" if auth else "a client without PREFECT_API_AUTH_STRING"
            sys.exit(f"error: the Prefect server {redact_url(url)} refused {given} (HTTP {error.code})")
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                sys.exit(
                    f"error: the Prefect server {redact_url(url)} (PREFECT_API_URL) did not answer within "
                    f"{within:.0f} s; start it, or unset PREFECT_API_URL to run on a temporary local one"
                )
            time.sleep(0.5)


def _prefect_tls() -> ssl.SSLContext:
    """Verification as Prefect's client does it: PREFECT_API_SSL_CERT_FILE's CA bundle, or none with
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY."""
    context = ssl.create_default_context(cafile=os.environ.get("PREFECT_API_SSL_CERT_FILE") or None)
    if os.environ.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() in ("1", "true"):
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def exit_unless_trials_fit(config: SweepConfig) -> None:
    """exit_unless_hardware_fits for the trials, when they run in this process's pool (threads or
    processes); a cluster's workers have hardware of their own."""
    if config.task_runner in ("threads", "processes"):
        exit_unless_hardware_fits(config.base)


def _assignment(parser: argparse.ArgumentParser, flag: str, item: str) -> tuple[str, str]:
    """'batch-size=32,64' -> ('batch_size', '32,64')."""
    name, equals, value = item.partition("=")
    if not equals or not name.strip() or not value.strip():
        parser.error(f"{flag} {item!r}: expected FIELD=VALUE")
    return name.strip().replace("-", "_"), value.strip()


def _search_range(parser: argparse.ArgumentParser, name: str, text: str) -> SearchRange:
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError
        return SearchRange(low=float(parts[0]), high=float(parts[1]), log=len(parts) == 3)
    except ValueError:
        parser.error(f"--space {name}={text}: expected LOW:HIGH or LOW:HIGH:log with numbers")
    raise AssertionError("unreachable: parser.error exits")


def _validate(parser: argparse.ArgumentParser, config_class: type[Config], values: dict) -> Config:
    if isinstance(values.get("classes"), str):
        values["classes"] = [c.strip() for c in values["classes"].split(",") if c.strip()]
    try:
        return config_class(**values)
    except ValidationError as error:
        parser.error(_describe(error))
    raise AssertionError("unreachable: parser.error exits")


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        flag = "--" + "-".join(str(part) for part in problem["loc"][:1]).replace("_", "-")
        value = problem.get("input")
        if isinstance(value, str) and not value.isprintable():
            value = repr(value)  # control characters would reach the terminal as they are
        where = f"{flag} {value}: " if problem["loc"] else ""
        lines.append(where + problem["msg"].removeprefix("Value error, "))
    return "invalid settings:\n  " + "\n  ".join(lines)


@contextmanager
def short_user_errors(errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """While a CLI runs its flow, console log records about `errors` keep their one-line message but
    not their traceback (the CLI prints the error itself, and the user can act on it); other
    exceptions keep their tracebacks, and Prefect's API (the UI) still gets everything."""
    handlers = _console_handlers()
    formatters = [handler.formatter for handler in handlers]
    for handler, formatter in zip(handlers, formatters):
        handler.setFormatter(_ShortUserErrors(formatter or logging.Formatter(), errors))
    try:
        yield
    finally:
        for handler, formatter in zip(handlers, formatters):
            handler.setFormatter(formatter)


class _ShortUserErrors(logging.Formatter):
    """Formats with `inner`, leaving out the traceback of records about one of `errors`."""

    def __init__(self, inner: logging.Formatter, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.inner, self.errors = inner, errors

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _console_handlers() -> list[logging.Handler]:
    """The stream handlers (Prefect's console handler among them) of every logger, not files."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {
        id(handler): handler
        for logger in loggers
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    }
    return list(handlers.values())
