"""Default settings: training seconds and test accuracy of settings on every offline dataset.

Trains with the project's train() on digits, synthetic and the generated 60k set
(`benchmarks/digits60k.py`), for the previous defaults (CNN, 8 epochs, batch 64, AdamW 3e-3,
one-cycle, fp32 NCHW), the current TrainConfig defaults, and any --try settings, all in one
process, and prints one table (also written to benchmarks/results/default_settings.md). Accuracy
is the fp32 model's on the test split.

    python benchmarks/default_settings.py [--datasets digits,synthetic,digits60k]
        [--try "epochs=5,batch_size=128,lr=4e-3,precision=bf16"]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.digits60k import write_digits60k  # noqa: E402
from benchmarks.results_file import Printed, write_result  # noqa: E402
from flows.config import TrainConfig  # noqa: E402
from flows.recipe import model_spec, train_settings  # noqa: E402
from tasks.data.datasets import prepare_dataset  # noqa: E402
from tasks.data.loaders import make_loaders  # noqa: E402
from tasks.train import speed  # noqa: E402
from tasks.train.training import evaluate_loss, train  # noqa: E402

PREVIOUS = {"epochs": 8, "batch_size": 64, "lr": 3e-3, "precision": "fp32", "channels_last": False}


def parse_setting(text: str) -> dict:
    """'epochs=5,lr=4e-3' -> {'epochs': 5, 'lr': 0.004}; numbers parsed, the rest kept as text."""
    setting = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
        setting[key] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    return setting


def measure(
    dataset_name: str, data_dir: Path, setting: dict, scratch: Path, device: str
) -> tuple[float, float]:
    """(training seconds, test accuracy) of one setting on one dataset."""
    channels_last = setting.get("channels_last", True)
    fields = {key: value for key, value in setting.items() if key != "channels_last"}
    config = TrainConfig(dataset=dataset_name, data_dir=str(data_dir), device=device, **fields)
    dataset = prepare_dataset(config.dataset, data_dir)
    loaders = make_loaders(dataset, config.batch_size, config.val_fraction, config.seed, device)
    settings = train_settings(config)
    settings = type(settings)(**{**settings.__dict__, "channels_last": channels_last})
    checkpoint = scratch / f"{time.monotonic_ns()}.pt"
    started = time.perf_counter()
    model, _ = train(model_spec(config, dataset), loaders, settings, checkpoint)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds, evaluate_loss(model.float(), loaders.test)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,synthetic,digits60k")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "benchmarks")
    parser.add_argument("--try", dest="tries", action="append", default=[], help="key=value,... to compare")
    parser.add_argument("--skip-previous", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    settings = {} if args.skip_previous else {"previous defaults": PREVIOUS}
    settings["current defaults"] = {}
    settings.update({text: parse_setting(text) for text in args.tries})
    threads = speed.set_threads(None)
    out = Printed()
    out(f"threads={threads} torch={torch.__version__} device={args.device}")
    out(f"{'dataset':10s} {'setting':48s} {'seconds':>8s} {'accuracy':>9s}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.datasets.split(","):
            source = "fashion-mnist" if name == "digits60k" else name
            data_dir = write_digits60k(args.data_dir) if name == "digits60k" else args.data_dir
            for label, setting in settings.items():
                seconds, accuracy = measure(source, data_dir, setting, Path(scratch), args.device)
                out(f"{name:10s} {label:48s} {seconds:8.1f} {accuracy:9.4f}")
    result = "default_settings" if args.device == "cpu" else f"default_settings_{args.device}"
    write_result(result, "Default settings: training seconds and test accuracy", out.block())


if __name__ == "__main__":
    main()
