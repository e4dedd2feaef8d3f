"""MkDocs hook: the flag tables of docs/flags.md, generated at build time from the parsers that
flows/cli.py builds out of the pydantic configs, so the page cannot drift from the command lines."""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- flags: (?P<command>[\w-]+) -->$", re.M)
COMMANDS = {  # marker: the command whose flags replace it
    "train": "python flows/train_flow.py",
    "sweep": "python flows/sweep_flow.py",
    "predict": "python flows/predict_flow.py",
}
_TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "switch"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replaces each `<!-- flags: COMMAND -->` line of flags.md with that command's tables."""
    if page.file.src_uri != "flags.md":
        return markdown
    return MARKER.sub(lambda found: command_markdown(found["command"]), markdown)


def command_markdown(command: str) -> str:
    """The tables of one command's flags, group by group, as Markdown."""
    if command not in COMMANDS:
        raise ValueError(f"<!-- flags: {command} -->: no such command; flags.md knows {sorted(COMMANDS)}")
    parser, configs = command_parser(command)
    blocks = []
    for group in parser._action_groups:  # argparse keeps its groups only here
        actions = [action for action in group._group_actions if action.dest != "help"]
        if not actions:
            continue
        if group.title not in ("options", "optional arguments"):
            blocks.append(f"**{group.title}**: {html.escape(group.description or '', quote=False)}")
        blocks.append(flag_table(actions, configs))
    return "\n\n".join(blocks)


def command_parser(command: str) -> tuple[argparse.ArgumentParser, dict[str, tuple[str, type]]]:
    """The parser the command line uses, and for each flag's dest: (its field path, its config)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from flows import cli
    from flows.config import PredictConfig, TrainConfig
    from flows.sweep_config import SweepConfig

    if command == "predict":
        return cli.build_parser(PredictConfig, COMMANDS[command]), _paths(PredictConfig, "")
    if command == "train":
        return cli.build_parser(TrainConfig, COMMANDS[command]), _paths(TrainConfig, "")
    return _sweep_parser(cli), {**_paths(TrainConfig, "base."), **_paths(SweepConfig, "")}


def _paths(config: type, prefix: str) -> dict[str, tuple[str, type]]:
    return {name: (prefix + name, config) for name in config.model_fields}


class _Built(Exception):
    """Carries the sweep's parser out of parse_sweep_config, which builds it inline."""


def _sweep_parser(cli: Any) -> argparse.ArgumentParser:
    """parse_sweep_config's own parser, caught when it is complete (at parse_args)."""

    def stop(parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        raise _Built(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            cli.parse_sweep_config([])
        except _Built as built:
            return built.args[0]
    raise RuntimeError("flows.cli.parse_sweep_config no longer calls parse_args: update docs/hooks/flags.py")


def flag_table(actions: list[argparse.Action], configs: dict[str, tuple[str, type]]) -> str:
    """One row per flag: flag, config field, type or choices, default, description."""
    rows = ["| flag | field | type | default | description |", "|---|---|---|---|---|"]
    for action in actions:
        path, config = configs[action.dest]
        field = config.model_fields[action.dest]
        cells = [
            " / ".join(f"`{flag}`" for flag in action.option_strings),
            f"`{path}`",
            _type(action, field),
            _default(action, field),
            html.escape(action.help or "", quote=False),
        ]
        rows.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    """A table cell: | escaped outside code spans (the tables extension leaves those whole)."""
    parts = text.split("`")
    return "`".join(part if index % 2 else part.replace("|", "\\|") for index, part in enumerate(parts))


def _type(action: argparse.Action, field: Any) -> str:
    if action.choices:
        return "one of " + ", ".join(f"`{choice}`" for choice in action.choices)
    annotation = _unwrap(field.annotation)
    if get_origin(annotation) is dict:  # --grid and --space: one FIELD=... per use
        return f"`{action.metavar}`, repeatable"
    if get_origin(annotation) is list:
        return "comma-separated list"
    words = [_TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))]
    for item in [*field.metadata, *_annotated_metadata(field.annotation)]:
        words += [
            f"{sign} {getattr(item, key)}" for key, sign in _BOUNDS if getattr(item, key, None) is not None
        ]
        if getattr(item, "pattern", None):
            words.append(f"matching `{item.pattern}`")
        if getattr(item, "func", None):
            words.append(f"checked by `{item.func.__module__}.{item.func.__name__}`")
    return ", ".join(words)


def _annotated_metadata(annotation: Any) -> list:
    """The constraints inside Annotated[...] (also under Optional), which pydantic leaves there."""
    if get_origin(annotation) is Annotated:
        inner = get_args(annotation)[1:]
        return [meta for item in inner for meta in getattr(item, "metadata", [item])]
    return [meta for arg in get_args(annotation) for meta in _annotated_metadata(arg)]


def _unwrap(annotation: Any) -> Any:
    """Optional[X] and Annotated[X, ...] -> X."""
    if get_origin(annotation) is Annotated:
        return _unwrap(get_args(annotation)[0])
    if get_origin(annotation) is Union:
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _unwrap(inner[0]) if len(inner) == 1 else annotation
    return annotation


def _default(action: argparse.Action, field: Any) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.default in (None, []):
        return "none"
    return f"`{action.default}`"
