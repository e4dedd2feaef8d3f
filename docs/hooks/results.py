"""MkDocs hook: on speed.md, a results file the benchmarks have not written in this checkout is
said to be missing, where pymdownx.snippets would silently include nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SNIPPET = re.compile(r'^--8<-- "(?P<name>[\w.-]+\.md)"$', re.M)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replaces the include line of each absent results file with a note naming the file."""
    if page.file.src_uri != "speed.md":
        return markdown
    return SNIPPET.sub(_note_if_missing, markdown)


def _note_if_missing(found: re.Match) -> str:
    if (RESULTS / found["name"]).is_file():
        return found.group(0)
    return f"*No figures in this checkout: the command above writes `benchmarks/results/{found['name']}`.*"
