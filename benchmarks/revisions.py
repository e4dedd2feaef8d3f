"""What the before/after benchmarks share: another commit's tree to measure, the version measured,
and the results file each run writes (benchmarks/results/NAME[-REF].md)."""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def extract(ref: str, into: Path) -> Path:
    """The tree of commit `ref`, from `git archive` (no worktree, nothing in .git changes)."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def git(*words: str) -> str:
    """What a git command prints in this checkout; "unknown" without git or a repository."""
    try:
        done = subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def code_version(ref: Optional[str] = None) -> str:
    """The commit measured: `ref`, else HEAD, marked when files outside benchmarks/ have changes."""
    if ref:
        return git("rev-parse", "--short", ref)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def write_result(name: str, ref: Optional[str], note: str, output: Optional[Path] = None) -> Path:
    """Writes `note` to `output`, else benchmarks/results/NAME.md (NAME-REF.md for another commit),
    and prints it."""
    suffix = "-" + re.sub(r"[^\w.-]", "-", ref) if ref else ""
    output = output or ROOT / f"benchmarks/results/{name}{suffix}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(note + "\n")
    print(note)
    return output
