"""MkDocs hook: speed.md's links to the benchmark results files become the files themselves.

In the repository, speed.md links each results file (`Figures: [NAME.md](../benchmarks/results/NAME.md)`),
which reads on GitHub; the site shows the figures in place instead. A file the benchmarks have not
written in this checkout becomes a note naming it. A link this hook misses stays a link out of the
docs folder, which `mkdocs build --strict` refuses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
FIGURES = re.compile(r"^Figures: \[[^\]\n]+\]\(\.\./benchmarks/results/(?P<name>[\w.-]+\.md)\)\.?$", re.M)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replaces each `Figures: [...](../benchmarks/results/NAME.md)` line with that file's text."""
    if page.file.src_uri != "speed.md":
        return markdown
    return FIGURES.sub(_figures, markdown)


def _figures(found: re.Match) -> str:
    path = RESULTS / found["name"]
    if path.is_file():
        return path.read_text().strip()
    return f"*No figures in this checkout: the command above writes `benchmarks/results/{found['name']}`.*"
