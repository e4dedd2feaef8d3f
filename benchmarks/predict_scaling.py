"""Prediction scaling: images/s of CSV prediction for 10k and 60k rows, in partitions of 10k.

For each size, a CSV of that many rows (28x28 grey PNGs, the rows cycling through --distinct
files) is listed with `csv_inputs`, cut with `partitions(--partition-size)` and each part is
predicted with `predict_to_csv` by a small network of models/ (--model, randomly initialised), one
part after another, then the parts are merged: the prediction flow's plain functions, in process.
Each size runs in a fresh process, so no size warms the next. images/s counts everything from
listing to the merged CSV; prediction that scales linearly gives the same images/s at every size,
and the verdict compares the largest size's rate with the smallest's (within --tolerance, 20%).

With `--ref GIT_REF` the same measurement runs that commit's code (extracted with `git archive`)
and writes benchmarks/results/predict_scaling-REF.md; without it, the working tree's code and
benchmarks/results/predict_scaling.md.

    python benchmarks/predict_scaling.py [--rows 10000,60000] [--partition-size 10000]
        [--distinct 300] [--model cnn] [--batch-size 512] [--repeats 1] [--ref GIT_REF] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import code_version, write_result  # benchmarks/results_file.py
from revisions import ROOT, extract  # benchmarks/revisions.py

SIDE = 28
CLASSES = tuple(str(k) for k in range(10))


def write_data(folder: Path, sizes: list[int], distinct: int) -> None:
    """`distinct` random grey PNGs under folder/img and one CSV per size, rows-N.csv, whose rows
    cycle through them with labels among CLASSES (the first size warms up, untimed)."""
    import torch
    from torchvision.io import write_png

    (folder / "img").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for k in range(distinct):
        image = torch.randint(0, 256, (1, SIDE, SIDE), dtype=torch.uint8, generator=generator)
        write_png(image, str(folder / "img" / f"{k:04d}.png"))
    for size in sizes:
        lines = ["image,label"] + [f"img/{k % distinct:04d}.png,{CLASSES[k % 10]}" for k in range(size)]
        (folder / f"rows-{size}.csv").write_text("\n".join(lines) + "\n")


def measure(code: Path, data: Path, rows: int, args: argparse.Namespace) -> dict:
    """One size, in this process, with the project code at `code`: seconds listing and predicting."""
    sys.path.insert(0, str(code))
    import torch

    from models import build_model
    from tasks.data.decoding import Preprocessing
    from tasks.predict.image_inputs import csv_inputs, partitions
    from tasks.predict.prediction import RegisteredModel, merge_csvs, predict_to_csv
    from tasks.train import speed

    if not Path(speed.__file__).resolve().is_relative_to(code.resolve()):  # an installed copy won
        raise SystemExit(f"measuring {code} imported the project from {speed.__file__}")
    speed.set_threads(None)
    network = build_model(args.model, 1, (SIDE, SIDE), len(CLASSES)).eval()

    class Network:  # what predict_to_csv asks of a model: predict(float32 pixels) -> logits
        @torch.inference_mode()
        def predict(self, pixels):
            return network(torch.from_numpy(pixels)).numpy()

    prep = Preprocessing(1, (SIDE, SIDE))
    registered = RegisteredModel("models:/scaling/1", "1", "run", CLASSES, (1, SIDE, SIDE), prep)
    model, out = Network(), Path(tempfile.mkdtemp(prefix="parts-", dir=data))
    # One batch through the whole path first, untimed: imports, plugins and torch's first call
    # cost about a second once per process, which would be a tenth of the smallest size's time.
    warm = csv_inputs(data / f"rows-{args.batch_size}.csv", data, CLASSES)
    predict_to_csv(model, warm, registered, args.batch_size, out / "warm.csv")
    started, cpu = time.perf_counter(), time.process_time()
    inputs = csv_inputs(data / f"rows-{rows}.csv", data, CLASSES)
    listed = time.perf_counter()
    parts = partitions(inputs, args.partition_size)
    paths = [out / f"part-{k:05d}.csv" for k in range(len(parts))]
    for part, path in zip(parts, paths):
        predict_to_csv(model, part, registered, args.batch_size, path)
    merge_csvs(paths, out / "predictions.csv")
    done, cpu = time.perf_counter(), time.process_time() - cpu
    shutil.rmtree(out)
    return {
        "rows": rows,
        "parts": len(parts),
        "listing": listed - started,
        "predicting": done - listed,
        "cpu": cpu,
    }


def run_size(code: Path, data: Path, rows: int, args: argparse.Namespace) -> dict:
    """`measure` for one size in a fresh Python process."""
    command = [sys.executable, __file__, "--measure", str(rows), "--code", str(code), "--data", str(data)]
    command += ["--model", args.model, "--batch-size", str(args.batch_size)]
    command += ["--partition-size", str(args.partition_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measuring {rows} rows failed:\n{done.stderr[-4000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found["rate"] = rows / (found["listing"] + found["predicting"])
    print(
        f"{rows:8,d} rows, {found['parts']:3d} parts: listing {found['listing']:6.1f} s, "
        f"predicting {found['predicting']:6.1f} s, {found['rate']:8,.0f} images/s, "
        f"{rows / found['cpu']:8,.0f} images per CPU second"
    )
    return found


def report(args: argparse.Namespace, found: list[dict]) -> list[str]:
    """The Markdown body under the shared header: one row per run, the ratio and the verdict."""
    best = {rows: max(run["rate"] for run in found if run["rows"] == rows) for rows in args.sizes}
    small, large = best[args.sizes[0]], best[args.sizes[-1]]
    ratio = large / small
    verdict = "pass" if abs(ratio - 1) < args.tolerance else "fail"
    lines = [
        f"{args.model}, batch {args.batch_size}, partitions of {args.partition_size:,} rows predicted one "
        f"after another in one process; {args.distinct} distinct {SIDE}x{SIDE} grey PNGs.",
        "",
        "| rows | partitions | listing (s) | predicting (s) | images/s | images per CPU second |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in found:
        lines.append(
            f"| {run['rows']:,} | {run['parts']} | {run['listing']:.1f} | {run['predicting']:.1f} "
            f"| {run['rate']:,.0f} | {run['rows'] / run['cpu']:,.0f} |"
        )
    cpu = {rows: max(run["rows"] / run["cpu"] for run in found if run["rows"] == rows) for rows in args.sizes}
    cpu_small, cpu_large = cpu[args.sizes[0]], cpu[args.sizes[-1]]
    lines += [
        "",
        f"images/s at {args.sizes[-1]:,} rows over images/s at {args.sizes[0]:,} rows"
        + (" (best run of each size)" if args.repeats > 1 else "")
        + f": {large:,.0f} / {small:,.0f} = {ratio:.2f} (within {args.tolerance:.0%} of 1: {verdict}); "
        f"per CPU second (this process's CPU time, which other load on the machine hardly moves): "
        f"{cpu_large:,.0f} / {cpu_small:,.0f} = {cpu_large / cpu_small:.2f}.",
    ]
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,60000", help="CSV sizes, smallest first (100000 too)")
    parser.add_argument("--partition-size", type=int, default=10000)
    parser.add_argument("--distinct", type=int, default=300, help="distinct image files the rows name")
    parser.add_argument("--model", default="cnn", help="one of models.MODEL_NAMES")
    parser.add_argument("--batch-size", type=int, default=512, help="the prediction flow's default")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each size, alternating")
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--ref", help="measure this commit's code instead of the working tree")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/predict_scaling[-REF].md")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one size, in this process
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sizes = [int(size) for size in args.rows.split(",") if size]
    return args


def main() -> None:
    args = parse_args()
    if args.measure:
        print(json.dumps(measure(args.code, args.data, args.measure, args)))
        return
    version = code_version(args.ref)  # before the runs: others may commit while they go on
    scratch = Path(tempfile.mkdtemp(prefix="predict-scaling-"))
    try:
        code = extract(args.ref, scratch / "code") if args.ref else ROOT
        label = f"commit {args.ref}" if args.ref else "working tree"
        write_data(scratch / "data", [args.batch_size, *args.sizes], args.distinct)
        print(f"{label}: {args.model}, rows {args.sizes}, partitions of {args.partition_size}")
        found = [
            run_size(code, scratch / "data", rows, args) for _ in range(args.repeats) for rows in args.sizes
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    title, body = f"Prediction scaling: {label}", report(args, found)
    write_result("predict_scaling", title, body, args.ref, args.output, version)


if __name__ == "__main__":
    main()
