"""Command lines generated from the flows' configs: one flag per field, errors that name the value;
the checks of the servers a command line uses, and one-line user errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Literal, Optional, TypeVar, get_args, get_origin

import httpx
from prefect.client.orchestration import get_client
from prefect.exceptions import CancelledRun
from prefect.logging import get_logger
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    get_current_settings,
    temporary_settings,
)
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from common.errors import UserError
from common.redaction import redact_url
from flows.config import TrainConfig
from flows.source_settings import flag, settings_owners, source_classes
from tasks.data.source_base import source_name
from tasks.data.sources import DataSource
from tasks.track.delivery import TrackingUnavailableError, check_reachable

Config = TypeVar("Config", bound=BaseModel)
# Failures a user can act on: the command lines print their message instead of a traceback.
USER_ERRORS = (UserError, CancelledRun)
_ANSWER_SECONDS = 2.0  # for one request to the Prefect server; it is asked again until the bound


def build_parser(config_class: type[BaseModel], prog: str, skip: tuple = ()) -> argparse.ArgumentParser:
    """One flag per config field not in `skip`, with its description, choices and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=config_class.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_fields(parser, config_class, skip)
    return parser


def add_fields(parser: argparse._ActionsContainer, config_class: type[BaseModel], skip: tuple = ()) -> None:
    """Adds a flag for each field of `config_class` not in `skip`. A field that holds a data source
    is a choice of the sources' names (--dataset NAME), followed by a flag for each setting of any
    of them, said to be theirs."""
    for name, field in config_class.model_fields.items():
        if name in skip:
            continue
        sources = source_classes(field.annotation)
        if not sources:
            _add_flag(parser, name, field, field.description or "", field.is_required())
            continue
        default = field.default.name if isinstance(field.default, DataSource) else None
        names = tuple(map(source_name, sources))
        parser.add_argument(flag(name), dest=name, default=default, choices=names, help=field.description)
        for setting, owners in settings_owners(sources).items():
            info = owners[0].model_fields[setting]  # a setting two sources share is the same field
            _add_flag(parser, setting, info, f"{_datasets(owners)}: {info.description}", required=False)


def _add_flag(
    parser: argparse._ActionsContainer, name: str, field: FieldInfo, text: str, required: bool
) -> None:
    """--NAME for one field: a switch (--NAME / --no-NAME) for a bool, else a value."""
    default = None if field.is_required() else field.default
    if field.annotation is bool:
        parser.add_argument(
            flag(name), dest=name, default=default, action=argparse.BooleanOptionalAction, help=text
        )
        return
    choices = _literal_choices(field.annotation)
    parser.add_argument(
        flag(name),
        dest=name,
        default=default,
        required=required,
        choices=choices,
        help=text,
        metavar=None if choices else name.upper(),
    )


def _datasets(sources: list[type[DataSource]]) -> str:
    """'csv dataset', 'csv and folder datasets': whose setting a flag is."""
    return " and ".join(map(source_name, sources)) + (" datasets" if len(sources) > 1 else " dataset")


def flag_fields(config_class: type[BaseModel]) -> dict[str, tuple[str, type[BaseModel]]]:
    """For each flag's dest: the field it sets, as a path in the config (dataset.train_csv for a
    source's setting), and the model that declares that field."""
    fields: dict[str, tuple[str, type[BaseModel]]] = {}
    for name, field in config_class.model_fields.items():
        fields[name] = (name, config_class)
        for setting, owners in settings_owners(source_classes(field.annotation)).items():
            fields[setting] = (f"{name}.{setting}", owners[0])
    return fields


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
    return validate(parser, config_class, vars(parser.parse_args(argv)))


def validate(parser: argparse.ArgumentParser, config_class: type[Config], values: dict) -> Config:
    """`config_class(**values)`, or the parser's exit (status 2) naming each bad flag and value; a
    list field's flag is comma-separated (--classes cat,dog)."""
    for name, (_, model) in flag_fields(config_class).items():
        if isinstance(values.get(name), str) and _is_list(model.model_fields[name].annotation):
            values[name] = [item.strip() for item in values[name].split(",") if item.strip()]
    try:
        return config_class(**values)
    except ValidationError as error:
        parser.error(_describe(error, config_class))
    raise AssertionError("unreachable: parser.error exits")


def _is_list(annotation: object) -> bool:
    """list[...], also inside Optional."""
    return get_origin(annotation) is list or any(_is_list(arg) for arg in get_args(annotation))


def _describe(error: ValidationError, config_class: type[BaseModel]) -> str:
    """One line per problem, naming the flag and the value given."""
    holders = {name for name, field in config_class.model_fields.items() if source_classes(field.annotation)}
    lines = []
    for problem in error.errors():
        loc = problem["loc"]
        # a source's setting is at (field, source name, setting, ...): its flag is the setting's
        name = loc[2] if len(loc) > 2 and loc[0] in holders else (loc[0] if loc else "")
        value = problem.get("input")
        if isinstance(value, str) and not value.isprintable():
            value = repr(value)  # control characters would reach the terminal as they are
        where = f"{flag(str(name))} {value}: " if loc else ""
        lines.append(where + problem["msg"].removeprefix("Value error, "))
    return "invalid settings:\n  " + "\n  ".join(lines)


@contextmanager
def user_errors_exit() -> Iterator[None]:
    """A command line's block: a user error (USER_ERRORS) ends it with `error: MESSAGE` (exit status
    1), and log records about one keep their message but not their traceback."""
    try:
        with short_user_errors(USER_ERRORS):
            yield
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


def prepare_servers() -> None:
    """Before a command line starts any work: exits naming the MLflow tracking server or
    PREFECT_API_URL's Prefect server when it does not answer (or refuses the login). Without
    PREFECT_API_URL the run starts Prefect's temporary server, with its telemetry heartbeat off unless
    set: the heartbeat races the server's own SQLite writes ("database is locked" tracebacks) and
    has nothing to do with the run."""
    exit_unless_tracking_answers()
    exit_unless_prefect_answers()
    if not PREFECT_API_URL.value():
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def exit_unless_tracking_answers() -> None:
    """An HTTP tracking server that does not answer within 10 s is an error now, before any work
    (MLflow's own retries would take minutes to give up); a local store passes at once."""
    try:
        check_reachable()
    except TrackingUnavailableError as error:
        sys.exit(f"error: {error}")


def exit_unless_prefect_answers(within: float = 10.0) -> None:
    """A Prefect server named in PREFECT_API_URL (the environment or the active profile) that does
    not answer within `within` seconds, or refuses PREFECT_API_AUTH_STRING, is an error now, naming
    the server (never the auth string). Asked with Prefect's own client, TLS settings and all."""
    url = PREFECT_API_URL.value()
    if not url:
        return  # the flow runs on Prefect's own temporary server
    deadline = time.monotonic() + within
    while True:
        try:
            return _ask_version()
        except httpx.HTTPStatusError as error:
            code = error.response.status_code
            if code not in (401, 403):
                return  # it answers; anything else is for the run's own requests to report
            auth = get_current_settings().api.auth_string
            given = "PREFECT_API_AUTH_STRING" if auth else "a client without PREFECT_API_AUTH_STRING"
            sys.exit(f"error: the Prefect server {redact_url(url)} refused {given} (HTTP {code})")
        except httpx.TransportError as error:  # not listening, timed out, TLS refused
            if time.monotonic() >= deadline:
                sys.exit(
                    f"error: the Prefect server {redact_url(url)} (PREFECT_API_URL) did not answer within "
                    f"{within:.0f} s ({type(error).__name__}: {error}); start it, or unset PREFECT_API_URL "
                    "to run on a temporary local one"
                )
            time.sleep(0.5)


def _ask_version() -> None:
    """One request that needs the auth string (the health check does not), without the client's own
    retries: the caller asks again until its bound."""
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
        with get_client(sync_client=True, httpx_settings={"timeout": _ANSWER_SECONDS}) as client:
            client.api_version()


# The loggers Prefect reports a run's exceptions on: its engine's, and each flow and task run's.
RUN_LOGGERS = tuple(get_logger(name) for name in ("engine", "flow_runs", "task_runs"))


@contextmanager
def short_user_errors(
    errors: tuple[type[BaseException], ...], loggers: tuple[logging.Logger, ...] = RUN_LOGGERS
) -> Iterator[None]:
    """While a CLI runs its flow, console log records about `errors` keep their one-line message but
    not their traceback (the CLI prints the error itself, and the user can act on it); other
    exceptions keep their tracebacks, and Prefect's API (the UI) still gets everything. The console
    handlers are those the records of `loggers` reach (Prefect's on the root logger among them)."""
    handlers = _console_handlers(loggers)
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


def _console_handlers(loggers: tuple[logging.Logger, ...]) -> list[logging.Handler]:
    """The stream handlers, not files, that records of `loggers` reach: each logger's and its
    ancestors' up to one that does not propagate (Logger.handlers, .propagate and .parent)."""
    reached: dict[int, logging.Handler] = {}
    for start in loggers:
        logger: Optional[logging.Logger] = start
        while logger is not None:
            reached.update((id(handler), handler) for handler in logger.handlers)
            logger = logger.parent if logger.propagate else None
    return [
        handler
        for handler in reached.values()
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]
