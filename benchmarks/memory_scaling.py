"""Memory scaling: the flow's peak anonymous memory on N and 4N photos (128x128 RGB JPEGs).

For N and 4N generated photos in a class-folder tree (3 classes), runs the real CLI as a user
would (`python flows/train_flow.py --dataset folder --train-dir DIR --model cnn --epochs 1 ...`,
its own temporary Prefect server, MLflow in a SQLite file, each run in a fresh folder) and samples
every 0.1 s the memory of the process and all its descendants (the Prefect server, the decoding
workers), summed over the tree at each sample:

- RssAnon, the figure that counts: the pages of the memory-mapped prepared file are page cache
  the kernel can drop, so they are not the run's own;
- RssFile and Pss_Anon (shared anonymous pages divided among the forked processes that share
  them), for information.

With `--ref GIT_REF` the same runs use that commit's code (extracted with `git archive`); code
that has no folder dataset (`--train-dir` absent from its --help) gets the same photos as CSVs.
Prints both peaks, the Prefect task each fell in, the growth and whether it stays under
--limit-mb (150 MB); writes benchmarks/results/memory_scaling[-REF].md.

    python benchmarks/memory_scaling.py [--images 2000] [--model cnn] [--epochs 1] [--ref 777fcd4]
        [--repeats 1] [--arena-max N] [--keep DIR] [--output FILE]

`--repeats R` runs N, 4N, N, 4N, ... R times each and compares the highest peak of each size
(the peak moves by about +-150 MB between runs of one size: see the note). `--arena-max N` sets
MALLOC_ARENA_MAX for the runs. `--keep DIR` keeps each run's folder: flow.log and memory.csv
(every sample: the main process's RssAnon and the tree's sums), to see where the peak falls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from photos import class_image, write_rgb_jpeg  # noqa: E402  (tests/photos.py)
from results_file import code_version, write_result  # noqa: E402  (benchmarks/results_file.py)
from revisions import extract  # noqa: E402  (benchmarks/revisions.py)

CLASSES = ("alpha", "beta", "gamma")
FIELDS = {"RssAnon": "status", "RssFile": "status", "Pss_Anon": "smaps_rollup"}
SAMPLE_SECONDS = 0.1
TASK_FINISHED = re.compile(
    r"^(?P<clock>\d\d:\d\d:\d\d\.\d+) \| \w+ +\| Task run '(?P<task>[\w-]+?)-\w{3}' - Finished", re.M
)


def write_one(task: tuple[Path, int, int]) -> None:
    """One 128x128 photo of class `label`, the same for a seed."""
    path, label, seed = task
    write_rgb_jpeg(path, class_image(label, len(CLASSES), (128, 128), np.random.default_rng(seed)))


def write_tree(root: Path, count: int) -> list[tuple[str, int]]:
    """root/CLASS/NNNNN.jpg, `count` in all; returns (path under root, label) per photo."""
    rows = [(f"{CLASSES[i % 3]}/{i:05d}.jpg", i % 3) for i in range(count)]
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(write_one, [(root / path, label, i) for i, (path, label) in enumerate(rows)], chunksize=64)
    return rows


def dataset_flags(script: Path, root: Path, rows: list[tuple[str, int]], scratch: Path) -> list[str]:
    """The folder dataset's flags, or for code without one the same photos as train and test CSVs
    (every fifth photo for test, as the folder dataset's default --test-fraction 0.2)."""
    usage = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    if "--train-dir" in usage:
        return ["--dataset", "folder", "--train-dir", str(root), "--image-size", "128", "--augment", "none"]
    for name, part in (("train", [r for i, r in enumerate(rows) if i % 5]), ("test", rows[::5])):
        (scratch / f"{name}.csv").write_text("".join(f"{path},{CLASSES[label]}\n" for path, label in part))
    csvs = ["--train-csv", str(scratch / "train.csv"), "--test-csv", str(scratch / "test.csv")]
    return ["--dataset", "csv", *csvs, "--image-root", str(root)]


def process_memory(pid: int) -> dict[str, int]:
    """kB of each of FIELDS for one process; empty when it has exited."""
    values = {}
    for source in set(FIELDS.values()):
        try:
            text = Path(f"/proc/{pid}/{source}").read_text()
        except OSError:  # exited, or smaps_rollup not in this kernel
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if FIELDS.get(key) == source:
                values[key] = int(value.split()[0])
    return values


def tree_memory(process: psutil.Process) -> dict[str, dict[str, int]]:
    """FIELDS of `process` and each of its descendants alive at the read: "pid name" -> kB."""
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for member in members:
        try:
            name = " ".join(Path(part).name for part in member.cmdline()[:3])
        except psutil.Error:
            continue
        found[f"{member.pid} {name}"] = process_memory(member.pid)
    return found


@dataclass
class Run:
    images: int
    peaks: dict[str, int]  # kB, peak of each field summed over the tree
    at_peak: dict[str, int]  # kB of RssAnon per process at the RssAnon peak
    peak_step: str  # the Prefect task running at the RssAnon peak
    seconds: float
    returncode: int
    log_tail: str


def measure(script: Path, flags: list[str], cwd: Path, extra_env: dict[str, str]) -> Run:
    """Runs the flow script in `cwd` and samples its process tree's memory until it exits."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        **extra_env,
    }
    env.pop("PREFECT_API_URL", None)  # its own temporary server, as a user's first run
    peaks, at_peak, peak_time, started = dict.fromkeys(FIELDS, 0), {}, 0.0, time.perf_counter()
    with open(cwd / "flow.log", "w") as log, open(cwd / "memory.csv", "w") as samples:
        samples.write("time,main_rss_anon_kb," + ",".join(f"{key.lower()}_kb" for key in FIELDS) + "\n")
        process = subprocess.Popen(
            [sys.executable, str(script), *flags], cwd=cwd, env=env, stdout=log, stderr=log
        )
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            members = tree_memory(watched)
            sums = {key: sum(values.get(key, 0) for values in members.values()) for key in FIELDS}
            main = next(iter(members.values()), {}).get("RssAnon", 0)
            samples.write(f"{time.time():.2f},{main}," + ",".join(str(sums[key]) for key in FIELDS) + "\n")
            if sums["RssAnon"] > peaks["RssAnon"]:
                at_peak = {member: values.get("RssAnon", 0) for member, values in members.items()}
                peak_time = time.time()
            peaks = {key: max(peaks[key], sums[key]) for key in FIELDS}
            time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    log_text = (cwd / "flow.log").read_text(errors="replace")
    return Run(0, peaks, at_peak, step_at(log_text, peak_time), seconds, process.returncode, log_text[-3000:])


def step_at(log_text: str, moment: float) -> str:
    """The first Prefect task the log shows finishing after `moment` (a Unix time, same day)."""
    day = datetime.datetime.fromtimestamp(moment).date()
    for found in TASK_FINISHED.finditer(log_text):
        clock = datetime.datetime.strptime(found["clock"], "%H:%M:%S.%f").time()
        if datetime.datetime.combine(day, clock).timestamp() >= moment:
            return found["task"]
    return "after the last task"


def run_size(code: Path, count: int, args: argparse.Namespace, scratch: Path, repeat: int = 0) -> Run:
    """Writes `count` photos and measures one run of the flow on them, in a folder of their own."""
    folder = scratch / f"n{count}-{repeat}"
    folder.mkdir()
    rows = write_tree(folder / "photos", count)
    flags = dataset_flags(code / "flows/train_flow.py", folder / "photos", rows, folder)
    flags += ["--model", args.model, "--epochs", str(args.epochs), "--no-system-metrics"]
    flags += ["--registered-model", f"memory-{count}"]
    extra = {"MALLOC_ARENA_MAX": str(args.arena_max)} if args.arena_max else {}
    run = measure(code / "flows/train_flow.py", flags, folder, extra)
    run.images = count
    status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
    mb = {key: value / 1024 for key, value in run.peaks.items()}
    print(
        f"{count:6d} photos: peak RssAnon {mb['RssAnon']:7.0f} MB, RssFile {mb['RssFile']:6.0f} MB, "
        f"Pss_Anon {mb['Pss_Anon']:7.0f} MB; peak during {run.peak_step}; {run.seconds:5.0f} s; {status}"
    )
    if run.returncode:
        print(run.log_tail)
    return run


def report(args: argparse.Namespace, runs: list[Run]) -> list[str]:
    """The Markdown body under the shared header: one row per run, the growth and the verdict."""
    arena = f", MALLOC_ARENA_MAX={args.arena_max}" if args.arena_max else ""
    lines = [
        f"{args.model}, {args.epochs} epoch(s){arena}. Peaks of the flow's process tree (summed over its "
        f"processes), sampled every {SAMPLE_SECONDS} s.",
        "",
        "| photos | peak RssAnon (MB) | during | peak RssFile (MB) | peak Pss_Anon (MB) | seconds | exit |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        mb = {key: value / 1024 for key, value in run.peaks.items()}
        lines.append(
            f"| {run.images:,} | {mb['RssAnon']:,.0f} | {run.peak_step} | {mb['RssFile']:,.0f} "
            f"| {mb['Pss_Anon']:,.0f} | {run.seconds:.0f} | {run.returncode} |"
        )
    lines.append("")
    for run in runs:
        parts = ", ".join(f"{name} {kb / 1024:,.0f}" for name, kb in run.at_peak.items())
        lines.append(f"- RssAnon (MB) by process at the peak of the {run.images:,}-photo run: {parts}.")
    small, large = (max(r.peaks["RssAnon"] for r in runs if r.images == n) / 1024 for n in sizes(args))
    growth = large - small
    verdict = "pass" if growth < args.limit_mb and all(run.returncode == 0 for run in runs) else "fail"
    lines += ["", f"RssAnon growth from {args.images:,} to {4 * args.images:,} photos"]
    lines[-1] += " (highest peak of each size)" if args.repeats > 1 else ""
    lines[-1] += (
        f": {small:,.0f} to {large:,.0f} MB, {growth:+,.0f} MB (limit {args.limit_mb:.0f} MB): {verdict}."
    )
    return lines


def sizes(args: argparse.Namespace) -> tuple[int, int]:
    return args.images, 4 * args.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="N; the second run has 4N")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ref", help="measure this commit's code instead of the working tree")
    parser.add_argument("--limit-mb", type=float, default=150.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each size, alternating")
    parser.add_argument("--arena-max", type=int, help="MALLOC_ARENA_MAX for the runs (default: unset)")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/memory_scaling[-REF].md")
    parser.add_argument("--keep", type=Path, help="keep each run's folder (flow.log, memory.csv) under here")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    version = code_version(args.ref)  # before the runs: others may commit while they go on
    scratch = Path(tempfile.mkdtemp(prefix="memory-scaling-", dir=args.keep))
    try:
        code = extract(args.ref, scratch / "code") if args.ref else ROOT
        label = f"commit {args.ref}" if args.ref else "working tree"
        print(f"{label}: {args.model}, {args.epochs} epoch(s), N={args.images}")
        runs = [run_size(code, count, args, scratch, r) for r in range(args.repeats) for count in sizes(args)]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    title, body = f"Memory scaling: {label}", report(args, runs)
    write_result("memory_scaling", title, body, args.ref, args.output, version)


if __name__ == "__main__":
    main()
