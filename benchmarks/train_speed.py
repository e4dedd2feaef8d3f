"""Training speed: samples/s of both models, fp32 NCHW against each speed lever and all of them.

Runs the project's own training step (`train_one_epoch`) over the same 28x28 images for every
setting in one process, so the ratios compare like with like. Each setting gets a warm-up pass
(for torch.compile that pass compiles; its seconds are printed too), then a timed pass. Writes
benchmarks/results/train_speed.md (train_speed_cuda.md on a GPU).

    python benchmarks/train_speed.py [--samples 12800] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.results_file import Printed, write_result  # noqa: E402
from flows.config import TrainConfig  # noqa: E402
from models import ModelSpec  # noqa: E402
from tasks.data.loaders import TensorLoader  # noqa: E402
from tasks.train import speed  # noqa: E402
from tasks.train.training import TrainSettings, build_training, train_one_epoch  # noqa: E402

# name: (precision, channels_last, compile); "bf16" becomes fp16 on a GPU without bf16.
SETTINGS = {
    "fp32 NCHW": ("fp32", False, False),
    "channels_last": ("fp32", True, False),
    "bf16 autocast": ("bf16", False, False),
    "channels_last+bf16": ("bf16", True, False),
    "compile": ("fp32", False, True),
    "channels_last+bf16+compile": ("bf16", True, True),
}


def rate(model_name: str, loader: TensorLoader, precision: str, channels_last: bool, compile: bool):
    """(samples/s of a timed pass, seconds of the warm-up pass)."""
    torch.manual_seed(0)
    spec = ModelSpec(model_name, 1, (28, 28), 10)
    settings = TrainSettings(2, "adamw", 5e-3, 1e-4, "onecycle", 0, precision, channels_last, compile)
    _, step_model, optimisation = build_training(spec, settings, loader.labels.device, len(loader))
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        train_one_epoch(step_model, loader, optimisation)
        if loader.labels.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return loader.num_samples / timings[1], timings[0]


def main() -> None:
    default_batch = TrainConfig.model_fields["batch_size"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12800)
    parser.add_argument("--batch-size", type=int, default=default_batch)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--skip", default="", help="comma-separated settings to leave out")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = speed.set_threads(None)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.samples, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.samples,), generator=generator)
    loader = TensorLoader(images, labels, args.batch_size, shuffle=True, device=device)
    bf16 = "bf16" if speed.resolve_precision("auto", device) == "bf16" or device.type == "cpu" else "fp16"
    out = Printed()
    out(
        f"device={device} threads={threads} batch_size={args.batch_size} samples={args.samples} "
        f"native_bf16={speed.resolve_precision('auto', device) == 'bf16'}"
    )
    for model_name in args.models.split(","):
        base = None
        for name, (precision, channels_last, compile) in SETTINGS.items():
            if name in args.skip.split(","):
                continue
            precision = bf16 if precision == "bf16" else precision
            samples_per_second, warmup = rate(model_name, loader, precision, channels_last, compile)
            base = base or samples_per_second
            out(
                f"{model_name:4s} {name:28s} {samples_per_second:9,.0f} samples/s  "
                f"{samples_per_second / base:5.2f}x  (warm-up pass {warmup:5.1f} s)"
            )
    result = "train_speed" if device.type == "cpu" else f"train_speed_{device.type}"
    write_result(result, f"Training speed on {device.type}: each lever against fp32 NCHW", out.block())


if __name__ == "__main__":
    main()
