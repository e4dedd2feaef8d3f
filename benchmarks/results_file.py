"""The results file every benchmark writes: benchmarks/results/NAME.md, a header saying when, where,
on which code and by which command it was measured, then the figures (docs/speed.md includes it)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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


def processor() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line]
    return (names[0] if names else "") or platform.processor() or platform.machine()


def command() -> str:
    """The command line that ran this benchmark, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def header(title: str, code: str) -> list[str]:
    """The title, the command, then date, machine (cores, CPU, memory, load) and the code measured."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"### {title}",
        "",
        f"`{command()}`",
        "",
        f"Measured {when} on {cores} cores ({processor()}), {memory:.0f} GiB, load average {load} "
        f"at the end; code {code}; Python {platform.python_version()}.",
        "",
    ]


def result_path(name: str, ref: Optional[str] = None) -> Path:
    """benchmarks/results/NAME.md, or NAME-REF.md for another commit's code."""
    suffix = "-" + re.sub(r"[^\w.-]", "-", ref) if ref else ""
    return RESULTS / f"{name}{suffix}.md"


def write_result(
    name: str,
    title: str,
    body: list[str],
    ref: Optional[str] = None,
    output: Optional[Path] = None,
    code: Optional[str] = None,
) -> Path:
    """Writes the header and `body` (Markdown lines) to `output`, else result_path(name, ref).
    `code` is code_version(ref) taken before the runs, when others may commit while they go on."""
    output = output or result_path(name, ref)
    code = code or code_version(ref)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")  # a reader never sees half a file
    part.write_text("\n".join(header(title, code) + body).rstrip() + "\n")
    part.replace(output)
    print(f"wrote {output}")
    return output


class Printed:
    """Lines printed as they come and kept, so the results file shows what the terminal did."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.extend(text.splitlines() or [""])

    def block(self) -> list[str]:
        """The kept lines as a fenced text block."""
        return ["```text", *self.lines, "```"]
