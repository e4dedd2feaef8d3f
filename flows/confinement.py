"""Parameters of a deployment run that name files stay under the folders the worker allows.

Whoever can create a flow run of a deployment chooses its parameters, and the flow run reads and
writes them as paths on the worker's machine; on the command line the user names their own files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel

from flows.config import resolve_path

ROOTS_VARIABLE = "PIC_ALLOWED_ROOTS"
# Parameters, in any of the flows' configs, whose value is a file or folder.
PATH_FIELDS = (
    "data_dir",
    "output_dir",
    "output",
    "train_csv",
    "test_csv",
    "image_root",
    "train_dir",
    "test_dir",
    "input_csv",
    "image_dir",
)
WEIGHTS_NAMES = ("none", "imagenet")  # --weights values that are not files


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
    """(parameter, path) for every parameter of `config` (a TrainConfig, PredictConfig or
    SweepConfig, whose base and grid count too) that names a file or folder."""
    for name in PATH_FIELDS:
        if value := getattr(config, name, None):
            yield prefix + name, value
    if getattr(config, "weights", "none") not in WEIGHTS_NAMES:
        yield prefix + "weights", config.weights
    mirror = getattr(config, "mirror", None)
    if mirror and mirror.startswith("file:"):
        yield prefix + "mirror", unquote(urlsplit(mirror).path)
    if isinstance(base := getattr(config, "base", None), BaseModel):
        yield from path_parameters(base, "base.")
    for value in getattr(config, "grid", {}).get("weights", ()):
        if value not in WEIGHTS_NAMES:
            yield "grid.weights", str(value)


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
