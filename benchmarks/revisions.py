"""Another commit's tree to measure, for the before/after benchmarks (memory_scaling.py,
predict_scaling.py); their results files are written by results_file.py."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, from `git archive` (no worktree, nothing in .git changes)."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into
