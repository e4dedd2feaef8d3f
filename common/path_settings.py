"""The mark of a setting that names a file or folder, on whichever config or data source declares it,
so that deployment runs can confine every such setting (flows.confinement) without a list of names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional
from urllib.parse import unquote, urlsplit

from pydantic import BeforeValidator


@dataclass(frozen=True)
class PathSetting:
    """Annotated metadata of a field whose value names a file or folder: `Annotated[str, PATH]`."""

    names: tuple[str, ...] = ()  # values that are names, not files (--weights none or imagenet)
    url: bool = False  # the value is a URL, and only a file:// one names a path

    def path(self, value: object) -> Optional[str]:
        """The path `value` names, or None: not given, one of `names`, or a URL that is not a file."""
        if not value or value in self.names:
            return None
        text = str(value)
        if not self.url:
            return text
        return unquote(urlsplit(text).path) if text.startswith("file:") else None


PATH = PathSetting()
FILE_URL = PathSetting(url=True)


def _as_text(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A file or folder, kept as the text the user gave (a pathlib.Path is taken too): a relative one
# means the working directory of the process that uses it, and the text is what runs log.
PathText = Annotated[str, BeforeValidator(_as_text), PATH]
OptionalPathText = Annotated[Optional[str], BeforeValidator(_as_text), PATH]


def resolve_path(path: str | os.PathLike) -> Path:
    """The absolute form of a user's path in this process's working directory, so that tasks in
    other threads or processes agree on it."""
    return Path(path).expanduser().resolve()


def path_marks(metadata: Iterable[Any]) -> list[PathSetting]:
    """The PathSetting marks among a pydantic field's metadata."""
    return [item for item in metadata if isinstance(item, PathSetting)]
