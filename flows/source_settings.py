"""A config field that holds a data source (tasks.data.sources), in the two forms users write it:
the source's name with its settings beside the config's own fields (flat: the command line's
flags, prefect.yaml's `dataset: digits`), or the source as an object (nested: the Prefect UI's
form). Configs store, log and dump the flat form, so `dataset` reads as the name and each of the
source's settings is a parameter of its own."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, BeforeValidator, Field

from tasks.data.source_base import source_name
from tasks.data.sources import DataSource


def source_union(classes: tuple[type[DataSource], ...]) -> Any:
    """The annotation of a field that holds one of `classes`, told apart by their names; its JSON
    schema (the Prefect UI's form, a deployment's parameter checks) takes a bare name too."""
    union = Annotated[Union[classes], Field(discriminator="name")]
    names = Literal[tuple(source_name(source) for source in classes)]
    return Annotated[union, BeforeValidator(_nested, json_schema_input_type=Union[names, union])]


def _nested(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


def source_classes(annotation: object) -> tuple[type[DataSource], ...]:
    """The source classes a field's annotation holds (also inside Optional), or () for any other."""
    if isinstance(annotation, type):
        return (annotation,) if issubclass(annotation, DataSource) else ()
    return tuple(found for arg in get_args(annotation) for found in source_classes(arg))


def settings_owners(classes: tuple[type[DataSource], ...]) -> dict[str, list[type[DataSource]]]:
    """Each setting of `classes` (every field but the name), with the classes that have it."""
    owners: dict[str, list[type[DataSource]]] = {}
    for source in classes:
        for setting in source.model_fields:
            if setting != "name":
                owners.setdefault(setting, []).append(source)
    return owners


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def lift(
    values: object, field: str, classes: tuple[type[DataSource], ...], default: Optional[DataSource]
) -> object:
    """A config's input with the source's flat settings moved under `field` (a name becomes
    {"name": ...}; none given is `default`). A setting not given (None), or given its own default,
    to a source that lacks it is dropped; any other value for another source, or a required
    setting missing, is a ValueError naming the flags."""
    if not isinstance(values, dict):
        return values
    owners = settings_owners(classes)
    flat = {key: values[key] for key in owners if key in values}
    given = values.get(field, default)
    if not flat and (given is None or isinstance(given, BaseModel)):
        return values  # no source, or one made already
    rest = {key: value for key, value in values.items() if key not in flat}
    if given is None:
        _refuse_others(flat, owners, field, None)
        return rest
    settings = given.model_dump() if isinstance(given, BaseModel) else dict(_nested(given))
    chosen = next((source for source in classes if source_name(source) == settings.get("name")), None)
    if chosen is None:
        return {**rest, field: settings}  # pydantic names the unknown source and the known ones
    own = chosen.model_fields
    _refuse_others({key: value for key, value in flat.items() if key not in own}, owners, field, chosen)
    settings.update({key: value for key, value in flat.items() if key in own and value is not None})
    missing = [key for key, info in own.items() if info.is_required() and settings.get(key) in (None, "")]
    if missing:
        raise ValueError(f"{field} {source_name(chosen)!r} needs {', '.join(map(flag, missing))}")
    return {**rest, field: settings}


def _refuse_others(
    others: dict[str, object],
    owners: dict[str, list[type[DataSource]]],
    field: str,
    chosen: Optional[type[DataSource]],
) -> None:
    """Raises a ValueError for the first setting in `others` given a value of its own, naming the
    flags of the sources that have it (all of theirs that no other source has)."""
    for key, value in others.items():
        if value is None or value == owners[key][0].model_fields[key].default:
            continue
        group = owners[key]
        flags = [flag(name) for name, holders in owners.items() if holders == group]
        names = " or ".join(source_name(source) for source in group)
        verb = "applies" if len(flags) == 1 else "apply"
        but = f", not {source_name(chosen)!r}" if chosen else ""
        raise ValueError(f"{', '.join(flags)} {verb} only to --{field} {names}{but}")


def flatten(dumped: dict[str, Any], field: str) -> dict[str, Any]:
    """A config's dump with the source under `field` spread out: `field` is its name, followed by
    its settings."""
    flat: dict[str, Any] = {}
    for key, value in dumped.items():
        if key == field and isinstance(value, dict):
            flat[key] = value["name"]
            flat.update((setting, item) for setting, item in value.items() if setting != "name")
        else:
            flat[key] = value
    return flat
