"""A long fuzzing run of the readers of untrusted files: tests/test_fuzz.py's properties (the image
header readers on arbitrary and mutated bytes, the decoder on mutated images, the CSV reader on
arbitrary CSVs) with many more examples than the suite's fixed 150, drawn at random each run.

Prints, per property, the examples that passed, failed and were discarded, and exits non-zero
when any input raised something other than the project's own input errors (Hypothesis then prints
the smallest such input and its traceback). The table goes to benchmarks/results/fuzz.md.

    python benchmarks/fuzz.py [--examples 20000] [--fixed] [-k decoder]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import Printed, write_result  # noqa: E402

_COUNTS = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="examples per property")
    parser.add_argument("--fixed", action="store_true", help="the suite's fixed examples, not random")
    parser.add_argument("-k", default="", help="only the properties whose names match (pytest -k)")
    args = parser.parse_args(argv)
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples)}
    if not args.fixed:
        env["FUZZ_RANDOM"] = "1"
    command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-p", "no:xdist", "-q"]
    command += ["--hypothesis-show-statistics", "-p", "no:cacheprovider"] + (["-k", args.k] if args.k else [])
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    names = re.findall(r"tests/test_fuzz.py::(\w+):", result.stdout)
    counts = _COUNTS.findall(result.stdout)
    out = Printed()
    out(f"{'property':<45} {'passing':>8} {'failing':>8} {'invalid':>8}")
    for name, (passing, failing, invalid) in zip(names, counts):
        out(f"{name:<45} {passing:>8} {failing:>8} {invalid:>8}")
    out(f"{time.monotonic() - started:.0f} s, {'fixed' if args.fixed else 'random'} examples")
    out(f"pytest exit status {result.returncode}")
    write_result("fuzz", "Fuzzing the readers of untrusted files", out.block())
    if result.returncode != 0:
        print(result.stdout[-20_000:], result.stderr[-5_000:], sep="\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
