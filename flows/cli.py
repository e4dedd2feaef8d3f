"""Command lines generated from the flows' configs: one flag per field, errors that name the value."""

from __future__ import annotations

import argparse
from typing import Literal, Optional, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from flows.config import TrainConfig

Config = TypeVar("Config", bound=BaseModel)


def build_parser(config_class: type[BaseModel], prog: str) -> argparse.ArgumentParser:
    """One flag per config field, with its description, choices and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=config_class.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in config_class.model_fields.items():
        choices = _literal_choices(field.annotation)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None if field.is_required() else field.default,
            required=field.is_required(),
            choices=choices,
            help=field.description,
            metavar=None if choices else name.upper(),
        )
    return parser


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
    values = vars(parser.parse_args(argv))
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
        where = f"{flag} {value}: " if problem["loc"] else ""
        lines.append(where + problem["msg"].removeprefix("Value error, "))
    return "invalid settings:\n  " + "\n  ".join(lines)
