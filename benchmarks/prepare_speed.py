"""Photo pipeline speed: the prepared file against torchvision's ImageFolder + DataLoader.

On a generated class-folder tree of JPEGs of mixed sizes (150 to 500 px a side, like photos):

- preparation: `prepare_dataset` of a `FolderSource` with one worker per core (listing, header
  checks, decoding, resizing, digests, channel statistics; a fresh data dir each time) against one pass of
  ImageFolder + DataLoader(num_workers=cores) doing the same Resize + CenterCrop, images/s;
- training: one epoch per backbone and size through the project's step (`build_training` +
  `train_one_epoch`: channels-last and bf16 autocast where the device computes it natively), fed
  once by the prepared file (TensorLoader, augment="standard", on the device) and once by a
  DataLoader(num_workers=cores) doing the same augmentation per image with PIL (RandomResizedCrop,
  flip, ColorJitter), samples/s. Network, optimiser and levers are the same, so the ratio is the
  data pipeline's. Each side trains one batch before the timed epoch.

With `--repeats R` each case runs R times (the two sides taking turns to go first) and the table
keeps the best of each side: on a shared machine other processes' threads slow single runs by up
to several times, and the best run is the nearest to an idle machine.

Prints the figures and writes them to benchmarks/results/prepare_speed.md (results_file.py's header).

    python benchmarks/prepare_speed.py [--images 3000] [--prepare-sizes 64,128]
        [--models resnet18,mobilenet_v3_large] [--sizes 64,128] [--train-images 256]
        [--device cpu] [--precision auto] [--repeats 1] [--data DIR]
        [--output benchmarks/results/prepare_speed.md]

`--prepare-sizes ""` leaves preparation out (the training part alone, as benchmarks/gpu_check.sh
runs it on CUDA). `--models` takes any of models.MODEL_NAMES, `--sizes` any sizes (224 too).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from photos import class_image, write_rgb_jpeg  # noqa: E402  (tests/photos.py)
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from benchmarks.results_file import processor, write_result  # noqa: E402
from flows.config import TrainConfig  # noqa: E402
from models import ModelSpec  # noqa: E402
from tasks.data.datasets import DatasetRef, load_tensors, prepare_dataset  # noqa: E402
from tasks.data.loaders import TensorLoader  # noqa: E402
from tasks.data.sources import FolderSource, Shape  # noqa: E402
from tasks.train import speed  # noqa: E402
from tasks.train.training import TrainSettings, build_training, train_one_epoch  # noqa: E402

CLASSES = ("alpha", "beta", "gamma")
SIDES = (150, 500)  # smallest and largest side of a generated photo


def write_one(task: tuple[Path, int, int]) -> None:
    """One photo of class `label`, of a random size, the same for a seed."""
    path, label, seed = task
    rng = np.random.default_rng(seed)
    height, width = (int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
    write_rgb_jpeg(path, class_image(label, len(CLASSES), (height, width), rng))


def write_tree(root: Path, count: int, workers: int) -> Path:
    """root/CLASS/NNNNN.jpg, `count` in all (kept when already there), in `workers` processes."""
    tasks = [(root / CLASSES[i % 3] / f"{i:05d}.jpg", i % 3, i) for i in range(count)]
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    with Pool(workers) as pool:
        pool.map(write_one, [task for task in tasks if not task[0].exists()], chunksize=32)
    return root


def prepare(tree: Path, size: int, workers: int, scratch: Path) -> tuple[float, DatasetRef]:
    """Seconds of a whole preparation into a fresh data dir, and its DatasetRef."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"prepared{size}-", dir=scratch))
    started = time.perf_counter()
    ref = prepare_dataset(
        FolderSource(train_dir=tree, test_fraction=0.2),
        data_dir,
        shape=Shape("3", (size, size), "crop"),
        workers=workers,
    )
    return time.perf_counter() - started, ref


def dataloader_pass(tree: Path, size: int, workers: int) -> float:
    """Seconds of one pass of ImageFolder + DataLoader with the same resize as preparation."""
    resize = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    loader = DataLoader(datasets.ImageFolder(str(tree), resize), batch_size=64, num_workers=workers)
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


class Feed:
    """A DataLoader (or the first `batches` of any loader) in the shape train_one_epoch reads."""

    def __init__(self, loader, device: torch.device, count: int, batches: int | None = None) -> None:
        self.loader, self.batches = loader, batches
        self.labels = torch.empty(0, device=device)  # train_one_epoch reads the device from it
        self.num_samples = count

    def __iter__(self):
        device = self.labels.device
        for images, labels in itertools.islice(self.loader, self.batches):
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def epoch_rate(model_name: str, size: int, loader, count: int, args: argparse.Namespace) -> float:
    """Samples/s of one epoch of the project's training step fed by `loader`, after one batch."""
    torch.manual_seed(0)
    device, batch_size = torch.device(args.device), args.batch_size
    spec = ModelSpec(model_name, 3, (size, size), len(CLASSES))
    settings = TrainSettings(2, "adamw", 5e-3, 1e-4, "onecycle", 0, args.precision, True, False)
    _, model, optimisation = build_training(spec, settings, device, -(-count // batch_size) + 1)
    train_one_epoch(model, Feed(loader, device, batch_size, batches=1), optimisation)
    started = time.perf_counter()
    train_one_epoch(model, loader, optimisation)  # ends in .item(): the device has finished
    return count / (time.perf_counter() - started)


def sample(total: int, count: int) -> torch.Tensor:
    """`count` of `total` indices, seeded: a random mix of photo sizes on either side."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count]


def project_loader(
    ref: DatasetRef, rows: torch.Tensor, batch_size: int, device: torch.device
) -> TensorLoader:
    data = load_tensors(ref.prepared_path)
    return TensorLoader(
        data.train_images, data.train_labels, batch_size, True, 0, device, indices=rows, augment="standard"
    )


def dataloader_feed(
    tree: Path, size: int, rows: torch.Tensor, batch_size: int, workers: int, device: torch.device
) -> Feed:
    """ImageFolder + DataLoader over `rows` of the tree, augmenting each image as the project's
    "standard" policy does a batch."""
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.35, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.2, 0.2, 0.2),
            transforms.ToTensor(),
        ]
    )
    images = Subset(datasets.ImageFolder(str(tree), augment), rows.tolist())
    loader = DataLoader(
        images,
        batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    return Feed(loader, device, len(rows))


def comparison_table(title: str, unit: str, rows: list[tuple[str, float, float]]) -> list[str]:
    """A Markdown table of (case, project rate, DataLoader rate) with the ratio."""
    header = f"| case | project ({unit}) | DataLoader ({unit}) | project / DataLoader |"
    lines = [f"### {title}", "", header, "|---|---:|---:|---:|"]
    for case, ours, theirs in rows:
        lines.append(f"| {case} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |")
    return lines + [""]


def machine_facts(device: torch.device, precision: str) -> str:
    """The device, torch and the levers training used (results_file's header has the machine)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else processor()
    return (
        f"Device {device} ({where}), torch {torch.__version__}, training precision "
        f"{speed.resolve_precision(precision, device)}, channels-last"
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: a shared machine's figures move with them."""
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def preparation_rows(args: argparse.Namespace, tree: Path, count: int, scratch: Path, refs: dict) -> list:
    """(case, project images/s, DataLoader images/s) per size, the best of --repeats each; fills
    `refs` with the prepared sets."""
    rows, cores = [], args.cores
    for size in [int(size) for size in args.prepare_sizes.split(",") if size]:
        ours, theirs = [], []
        for _ in range(args.repeats):
            seconds, refs[size] = prepare(tree, size, cores, scratch)
            ours.append(count / seconds)
            theirs.append(count / dataloader_pass(tree, size, cores))
        rows.append((f"{size}x{size}, {cores} workers", max(ours), max(theirs)))
        print(f"prepare {size}px: {rates(ours)} images/s   DataLoader: {rates(theirs)} images/s")
    return rows


def training_rows(args: argparse.Namespace, tree: Path, count: int, scratch: Path, refs: dict) -> list:
    """(case, project samples/s, DataLoader samples/s) per model and size, the best of --repeats
    each, the two sides taking turns to go first."""
    device, rows = torch.device(args.device), []
    for model_name, size in itertools.product(args.models.split(","), map(int, args.sizes.split(","))):
        if size not in refs:
            refs[size] = prepare(tree, size, args.cores, scratch)[1]
        n = min(args.train_images, refs[size].train_size)
        ours_rows, their_rows = (sample(total, n) for total in (refs[size].train_size, count))
        sides = {
            "ours": lambda: project_loader(refs[size], ours_rows, args.batch_size, device),
            "theirs": lambda: dataloader_feed(tree, size, their_rows, args.batch_size, args.cores, device),
        }
        found = {"ours": [], "theirs": []}
        for repeat in range(args.repeats):
            for side in ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours"):
                found[side].append(epoch_rate(model_name, size, sides[side](), n, args))
        rows.append((f"{model_name} {size}px", max(found["ours"]), max(found["theirs"])))
        ours, theirs = rates(found["ours"]), rates(found["theirs"])
        print(f"train {model_name} {size}px: {ours} samples/s   DataLoader: {theirs} samples/s")
    return rows


def rates(values: list[float]) -> str:
    return ", ".join(f"{value:,.1f}" for value in values)


def report(args: argparse.Namespace, count: int, facts: str, prep_rows: list, train_rows: list) -> list[str]:
    """The Markdown body under the shared header: the set-up, then both tables."""
    lines = [
        f"{facts}.",
        "",
        f"{count} generated JPEGs, {SIDES[0]} to {SIDES[1]} px a side, 3 classes; "
        f"training: one epoch of {args.train_images} images, batch {args.batch_size}. "
        + (f"Best of {args.repeats} runs of each case." if args.repeats > 1 else "One run of each case."),
        "",
    ]
    if prep_rows:
        lines += comparison_table("Preparation (whole tree, resize + centre crop)", "images/s", prep_rows)
    if train_rows:
        lines += comparison_table("One training epoch (standard augmentation)", "samples/s", train_rows)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="generated JPEGs, 3 classes")
    parser.add_argument("--prepare-sizes", default="64,128")
    parser.add_argument("--models", default="resnet18,mobilenet_v3_large")
    parser.add_argument("--sizes", default="64,128", help="training sizes, e.g. 64,128,224")
    parser.add_argument("--train-images", type=int, default=256, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.model_fields["batch_size"].default)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", default="auto", help="training precision, both sides (auto: the project's)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case; the table keeps the best")
    parser.add_argument("--data", type=Path, help="keep the generated tree here (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/prepare_speed.md")
    args = parser.parse_args()
    # all the cores this process may use, as fetch_dataset's default --prepare-workers
    device, cores = torch.device(args.device), len(os.sched_getaffinity(0))
    args.cores = cores
    threads = speed.set_threads(None)
    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as scratch:
        tree = write_tree(args.data or Path(scratch) / "photos", args.images, cores)
        count = sum(1 for _ in tree.rglob("*.jpg"))  # a kept --data tree may hold more
        facts, load_before = machine_facts(device, args.precision), load_average()
        print(f"{count} JPEGs in {tree}; {facts}; {threads} torch threads; load average {load_before}")
        refs: dict[int, DatasetRef] = {}
        prep_rows = preparation_rows(args, tree, count, Path(scratch), refs)
        train_rows = training_rows(args, tree, count, Path(scratch), refs)
    facts += f"; load average {load_before} at the start, {load_average()} at the end"
    body = report(args, count, facts, prep_rows, train_rows)
    write_result(
        "prepare_speed",
        "Photo pipeline: prepared file against ImageFolder + DataLoader",
        body,
        None,
        args.output,
    )


if __name__ == "__main__":
    main()
