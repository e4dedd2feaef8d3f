"""Parameters of a deployment run that name files stay under the folders the worker allows.

Whoever can create a flow run of a deployment chooses its parameters, and the flow run reads and
writes them as paths on the worker's machine; on the command line the user names their own files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from common.path_settings import path_marks, resolve_path

ROOTS_VARIABLE = "PIC_ALLOWED_ROOTS"


class ParameterOutsideRootsError(PermissionError):
    """A deployment run's parameter names a path outside the folders the worker allows."""


def allowed_roots() -> list[Path]:
    """The folders deployment runs may read and write under: PIC_ALLOWED_ROOTS (os.pathsep-separated),
    else the working directory (the worker's, where prefect.yaml's pull step puts flow runs)."""
    given = [part for part in os.environ.get(ROOTS_VARIABLE, "").split(os.pathsep) if part.strip()]
    return [resolve_path(part) for part in given] or [Path.cwd().resolve()]


def from_deployment() -> bool:
    """Whether this flow run was created from a deployment (by whoever can reach the Prefect API)."""
    from prefect.runtime import deployment

    return deployment.id is not None


def path_parameters(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(parameter, path) for every parameter of `config` that names a file or folder: the fields
    marked with common.path_settings.PATH (or a PathSetting of their own), in the config and the
    models it holds (a TrainConfig's dataset, a SweepConfig's base), and a sweep's grid values."""
    fields = type(config).model_fields
    for name, field in fields.items():
        value = getattr(config, name)
        for path in _paths(field, [value]):
            yield prefix + name, path
        if isinstance(value, BaseModel):
            yield from path_parameters(value, f"{prefix}{name}.")
    base, grid = getattr(config, "base", None), getattr(config, "grid", None)
    if isinstance(base, BaseModel) and isinstance(grid, dict):
        for name, values in grid.items():
            for path in _paths(type(base).model_fields.get(name), values):
                yield f"{prefix}grid.{name}", path


def _paths(field: Optional[FieldInfo], values: list[object]) -> Iterator[str]:
    """The paths `values` of a field name, by its marks (none for an unmarked field)."""
    for mark in path_marks(field.metadata if field else ()):
        for value in values:
            if (path := mark.path(value)) is not None:
                yield path


def check_confined(config: BaseModel) -> None:
    """In a deployment run, raises ParameterOutsideRootsError naming the first parameter whose path
    resolves (links followed) outside allowed_roots(); elsewhere, every path is the user's choice."""
    if not from_deployment():
        return
    roots = allowed_roots()
    for name, value in path_parameters(config):
        where = resolve_path(value)
        if not any(where.is_relative_to(root) for root in roots):
            listed = os.pathsep.join(map(str, roots))
            raise ParameterOutsideRootsError(
                f"parameter {name}={value!r} resolves to {where}, outside the folders this worker lets "
                f"deployment runs use ({listed}); give a path under them, or widen them by starting the "
                f"worker with {ROOTS_VARIABLE}={listed}{os.pathsep}/OTHER/FOLDER"
            )
