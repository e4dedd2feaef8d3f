"""MkDocs hook: the flag tables of docs/flags.md, generated at build time from the parsers that
flows/cli.py builds out of the pydantic configs, so the page cannot drift from the command lines.

The project is installed (`pip install -e '.[docs]'`), so its packages import like any library."""

from __future__ import annotations

import argparse
import html
import re
from typing import Annotated, Any, Union, get_args, get_origin
from unittest import mock

from flows.cli import build_parser, flag_fields
from flows.config import PredictConfig, TrainConfig
from flows.sweep_config import SweepConfig, parse_sweep_config

MARKER = re.compile(r"^<!-- flags: (?P<command>[\w-]+) -->$", re.M)
COMMANDS = {  # marker: the command whose flags replace it
    "train": "python flows/train_flow.py",
    "sweep": "python flows/sweep_flow.py",
    "predict": "python flows/predict_flow.py",
}
_TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "switch"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))
# A reader wants the form of a value, not the regular expression that checks it. A field with a
# pattern not listed here fails the build, naming it, so each new pattern gets its words.
PATTERN_WORDS = {
    r"^(https?|file)://": "a URL: `http://`, `https://` or `file://`",
    r"^[1-9][0-9]{0,4}(x[1-9][0-9]{0,4})?$": "`H` or `HxW` in pixels (`224`, `96x128`)",
    r"^[1-9][0-9]{0,9}$": "a version number (`3`)",
    r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$": "an event id (a UUID)",
}


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
    """The parser the command line uses, and for each flag's dest: (its field's path in the flow's
    parameter, the model that declares the field)."""
    if command == "predict":
        return build_parser(PredictConfig, COMMANDS[command]), flag_fields(PredictConfig)
    if command == "train":
        return build_parser(TrainConfig, COMMANDS[command]), flag_fields(TrainConfig)
    base = {dest: ("base." + path, model) for dest, (path, model) in flag_fields(TrainConfig).items()}
    return _sweep_parser(), {**base, **flag_fields(SweepConfig)}


class _Built(Exception):
    """Carries the sweep's parser out of parse_sweep_config, which builds it inline."""


def _sweep_parser() -> argparse.ArgumentParser:
    """parse_sweep_config's own parser, caught when it is complete (at parse_args)."""

    def stop(parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        raise _Built(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            parse_sweep_config([])
        except _Built as built:
            return built.args[0]
    raise RuntimeError("parse_sweep_config no longer calls parse_args: update docs/hooks/flags.py")


def flag_table(actions: list[argparse.Action], configs: dict[str, tuple[str, type]]) -> str:
    """One row per flag: flag and config field, type or choices, default, description."""
    rows = ["| flag and field | type | default | description |", "|---|---|---|---|"]
    for action in actions:
        path, model = configs[action.dest]
        field = model.model_fields[path.rpartition(".")[2]]
        # One line each (docs/stylesheets/extra.css keeps code in table cells whole), so a long
        # name is never broken mid-word and the description keeps most of the width.
        names = "<br>".join(f"`{flag}`" for flag in action.option_strings)
        cells = [
            f"{names}<br>field `{path}`",
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
            words[0] = _pattern_words(item.pattern, action)  # instead of plain `text`
        check = getattr(item, "func", None)
        if check is not None and not check.__name__.startswith("_"):  # a private one only converts
            where = check.__module__.replace(".", "/") + ".py"
            words.append(f"checked by `{check.__name__}` in `{where}`")
    return ", ".join(words)


def _pattern_words(pattern: str, action: argparse.Action) -> str:
    if pattern not in PATTERN_WORDS:
        raise ValueError(
            f"{action.option_strings[0]} is checked by the pattern {pattern!r}, which docs/hooks/flags.py "
            "cannot put in words: add it to PATTERN_WORDS"
        )
    return PATTERN_WORDS[pattern]


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
