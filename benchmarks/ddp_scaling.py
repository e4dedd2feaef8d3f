"""DDP scaling: one training in 1 and N processes at the same global batch, then the photo path's
memory with 1 and N processes.

Speed: the default CNN and settings (global batch 128, AdamW, one-cycle) on the 60,000/10,000
generated digits in FashionMNIST's file format (`benchmarks/digits60k.py`), on the CPU (or with
`--device cuda` on GPUs, N = every GPU, NCCL). One process with --threads threads (default: one per
core), trained in this process as `--devices 1` does; then N processes started by torch's elastic
launcher, the threads split between them, as `--devices N` does. Prints, per run, the mean
samples/s of the epochs after the first, the training seconds until validation accuracy first
reaches --target, and the final test accuracy; then N's figures over 1's. On CPU this is a report,
not a target: N processes share the same cores.

Memory: the command line as a user runs it (`python flows/train_flow.py --dataset folder ...`, its
own temporary Prefect server) on --photos generated 128x128 JPEGs, with --devices 1 and N; the peak
of RssAnon and of Pss_Anon summed over the run's process tree (benchmarks/memory_scaling.py's
sampler), and N's peak over 1's against --memory-limit (1.3). The ranks memory-map the prepared
file, so its pages are page cache, counted in neither.

Writes benchmarks/results/ddp_scaling.md (ddp_scaling_cuda.md with --device cuda).

    python benchmarks/ddp_scaling.py [--device cpu|cuda] [--devices N] [--epochs 3] [--target 0.97]
        [--photos 2000] [--data-dir data/benchmarks] [--skip-memory]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import torch  # noqa: E402
from digits60k import write_digits60k  # noqa: E402  (benchmarks/digits60k.py)
from memory_scaling import dataset_flags, measure, write_tree  # noqa: E402
from results_file import Printed, write_result  # noqa: E402

from flows.config import TrainConfig  # noqa: E402
from flows.recipe import train_settings  # noqa: E402
from models import ModelSpec  # noqa: E402
from tasks.data.datasets import DatasetRef, prepare_dataset  # noqa: E402
from tasks.data.loaders import make_loaders  # noqa: E402
from tasks.data.sources import FashionMnistSource  # noqa: E402
from tasks.train.checkpoints import load_model, load_weights  # noqa: E402
from tasks.train.launch import train_local  # noqa: E402
from tasks.train.ranks import RankJob  # noqa: E402
from tasks.train.training import evaluate_loss, train  # noqa: E402


def spec_of(dataset: DatasetRef, config: TrainConfig) -> ModelSpec:
    return ModelSpec(
        config.model, dataset.channels, dataset.image_size, dataset.num_classes, dataset.mean, dataset.std
    )


def run(
    dataset: DatasetRef, config: TrainConfig, devices: int, threads: int, folder: Path, device: str
) -> dict:
    """One training, as `--devices devices` runs it: its epochs' metrics and its test accuracy."""
    torch.set_num_threads(threads)
    loaders = make_loaders(dataset, config.batch_size, config.val_fraction, config.seed, device)
    spec, settings, checkpoint = spec_of(dataset, config), train_settings(config), folder / "last.pt"
    started = time.perf_counter()
    if devices == 1:
        _, history = train(spec, loaders, settings, checkpoint)
    else:
        job = RankJob(
            spec, settings, dataset, config.batch_size, config.val_fraction, "none", device,
            threads // devices, config.collective_timeout_seconds, str(checkpoint),
        )  # fmt: skip
        train_local(job, devices, folder / "ranks", lambda event: None)
        history = load_weights(checkpoint)["history"]
    wall = time.perf_counter() - started
    model = load_model(spec, load_weights(checkpoint)["model"]).to(device)
    test = evaluate_loss(model, loaders.test)["accuracy"]
    return {"history": history, "test_accuracy": test, "wall": wall}


def seconds_to(history: list[dict], target: float) -> float:
    """Training seconds until validation accuracy first reaches `target` (inf if never)."""
    elapsed = 0.0
    for epoch in history:
        elapsed += epoch["epoch_seconds"]
        if epoch["val_accuracy"] >= target:
            return elapsed
    return float("inf")


def speed_rows(args: argparse.Namespace, out: Printed) -> list[str]:
    config = TrainConfig(epochs=args.epochs)
    data_dir = write_digits60k(args.data_dir)
    dataset = prepare_dataset(FashionMnistSource(), data_dir)
    threads = args.threads or len(os.sched_getaffinity(0))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as scratch:
        for devices in (1, args.devices):
            folder = Path(scratch) / f"n{devices}"
            folder.mkdir()
            result = run(dataset, config, devices, threads, folder, args.device)
            later = result["history"][1:] or result["history"]
            rate = sum(e["samples_per_second"] for e in later) / len(later)
            reach = seconds_to(result["history"], args.target)
            rows[devices] = (rate, reach, result["test_accuracy"], result["wall"])
            split = f"{devices} process(es) x {max(1, threads // devices)} thread(s)"
            out(
                f"{split}: {rate:,.0f} samples/s, val accuracy {args.target} after {reach:.1f} s of "
                f"training, test accuracy {result['test_accuracy']:.4f}, {result['wall']:.0f} s wall"
            )
    (rate1, reach1, acc1, _), (rate_n, reach_n, acc_n, _) = rows[1], rows[args.devices]
    out(
        f"{args.devices} over 1: samples/s x{rate_n / rate1:.2f}, time to {args.target} "
        f"x{reach_n / reach1:.2f}, test accuracy {100 * (acc_n - acc1):+.2f} points"
    )
    return [
        f"CNN, default settings, {args.epochs} epochs, global batch {config.batch_size}, on the generated "
        f"60k digits; {'CUDA, NCCL' if args.device == 'cuda' else 'CPU, gloo'}.",
        "",
        "| processes x threads | samples/s (epochs 2+) | s to val accuracy "
        f"{args.target} | test accuracy | wall s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} x {max(1, threads // n)} | {rate:,.0f} | {reach:.1f} | {acc:.4f} | {wall:.0f} |"
            for n, (rate, reach, acc, wall) in rows.items()
        ),
        "",
        f"{args.devices} processes over 1: samples/s x{rate_n / rate1:.2f}, time to accuracy "
        f"x{reach_n / reach1:.2f}, test accuracy {100 * (acc_n - acc1):+.2f} points.",
    ]


def memory_rows(args: argparse.Namespace, out: Printed) -> list[str]:
    scratch = Path(tempfile.mkdtemp(prefix="ddp-memory-"))
    try:
        rows = write_tree(scratch / "photos", args.photos)
        peaks = {}
        for devices in (1, args.devices):
            folder = scratch / f"n{devices}"
            folder.mkdir()
            flags = dataset_flags(ROOT / "flows/train_flow.py", scratch / "photos", rows, folder)
            flags += ["--model", "cnn", "--epochs", "1", "--batch-size", "64", "--no-system-metrics"]
            flags += ["--devices", str(devices), "--data-dir", str(scratch / "data")]
            measured = measure(ROOT / "flows/train_flow.py", flags, folder, {})
            if measured.returncode:
                raise SystemExit(f"--devices {devices} failed:\n{measured.log_tail}")
            peaks[devices] = {key: kb / 1024 for key, kb in measured.peaks.items()}
            peak = peaks[devices]
            out(
                f"{args.photos} photos, --devices {devices}: peak RssAnon {peak['RssAnon']:,.0f} MB, "
                f"Pss_Anon {peak['Pss_Anon']:,.0f} MB, {measured.seconds:.0f} s"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratio = {key: peaks[args.devices][key] / peaks[1][key] for key in ("RssAnon", "Pss_Anon")}
    verdict = "pass" if ratio["RssAnon"] < args.memory_limit else "fail"
    out(f"peak RssAnon {args.devices} over 1: x{ratio['RssAnon']:.2f} (limit {args.memory_limit}): {verdict}")
    return [
        f"The command line on {args.photos} generated 128x128 JPEG photos (folder dataset, CNN, 1 epoch, "
        "batch 64), peaks summed over the run's process tree.",
        "",
        "| --devices | peak RssAnon (MB) | peak Pss_Anon (MB) |",
        "|---:|---:|---:|",
        *(f"| {n} | {p['RssAnon']:,.0f} | {p['Pss_Anon']:,.0f} |" for n, p in peaks.items()),
        "",
        f"{args.devices} over 1: RssAnon x{ratio['RssAnon']:.2f}, Pss_Anon x{ratio['Pss_Anon']:.2f} "
        f"(limit x{args.memory_limit} on RssAnon): {verdict}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--devices", type=int, help="default: 2 on CPU, every GPU on CUDA")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy to reach")
    parser.add_argument("--threads", type=int, help="default: one per core")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--memory-limit", type=float, default=1.3)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "benchmarks")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    args.devices = args.devices or (torch.cuda.device_count() if args.device == "cuda" else 2)
    out = Printed()
    body = ["#### Speed", "", *speed_rows(args, out)]
    if not args.skip_memory:
        body += ["", "#### Memory on the photo path", "", *memory_rows(args, out)]
    name = "ddp_scaling_cuda" if args.device == "cuda" else "ddp_scaling"
    write_result(name, f"DDP scaling: 1 and {args.devices} processes on {args.device}", body)


if __name__ == "__main__":
    main()
