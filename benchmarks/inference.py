"""Inference: onnxruntime against torch eager for both models, and the prediction flow's images/s.

Latency: the same exported network (28x28, 10 classes) at batch 1, 64 and 1024, median of
repeated calls after a warm-up, on the CPU. Throughput: trains a digits model for one epoch
into a scratch MLflow registry, writes --images PNGs to a folder and runs
`python flows/predict_flow.py` over it with both flavors, reporting images/s of the whole
command (start-up included) and of its predict steps alone. Writes
benchmarks/results/inference.md.

    python benchmarks/inference.py [--images 20000] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.flow_steps import flow_run_times, latest_flow_run_id  # noqa: E402
from benchmarks.results_file import Printed, write_result  # noqa: E402
from models import build_model  # noqa: E402
from tasks.publish.export import INPUT_NAME, OUTPUT_NAME, onnx_session, write_onnx  # noqa: E402
from tasks.train import speed  # noqa: E402

BATCHES = (1, 64, 1024)


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def latency_table(scratch: Path, repeats: int, out: Printed) -> None:
    out(f"{'model':5s} {'batch':>5s} {'torch ms':>9s} {'onnxruntime ms':>15s} {'torch/ort':>10s}")
    for name in ("cnn", "mlp"):
        torch.manual_seed(0)
        model = build_model(name, 1, (28, 28), 10).eval()
        session = onnx_session(write_onnx(model, torch.rand(2, 1, 28, 28), scratch / f"{name}.onnx"))
        for batch in BATCHES:
            pixels = torch.rand(batch, 1, 28, 28)
            array = pixels.numpy()
            with torch.inference_mode():
                eager = median_seconds(lambda: model(pixels), repeats)
            ort = median_seconds(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: array}), repeats)
            out(f"{name:5s} {batch:5d} {eager * 1e3:9.3f} {ort * 1e3:15.3f} {eager / ort:9.2f}x")


def prediction_throughput(scratch: Path, images: int, out: Printed) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
        "PREFECT_HOME": str(scratch / "prefect"),
    }
    common = ["--output-dir", str(scratch / "outputs")]
    train = [sys.executable, "flows/train_flow.py", "--dataset", "digits", "--epochs", "1"]
    train += ["--data-dir", str(scratch / "data"), "--registered-model", "bench", *common]
    subprocess.run(train, cwd=REPO, env=env, check=True, capture_output=True)
    folder = write_pngs(scratch / "images", images)
    for flavor in ("onnx", "pytorch"):
        command = [sys.executable, "flows/predict_flow.py", "--registered-model", "bench", "--flavor", flavor]
        command += ["--image-dir", str(folder), *common]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - started
        times = flow_run_times(env, latest_flow_run_id(scratch / "mlflow.db"))
        steps = sum(
            end - start for name, start, end in times["steps"] if name.startswith("predict-partition")
        )
        out(
            f"predict_flow.py --flavor {flavor:7s}: {images / wall:8,.0f} images/s end to end "
            f"({wall:.1f} s), "
            f"{images / steps:8,.0f} images/s in predict-partition ({steps:.1f} s)"
        )


def write_pngs(folder: Path, count: int) -> Path:
    from torchvision.io import write_png

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        write_png(
            torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=generator),
            str(folder / f"{index:06d}.png"),
        )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    out = Printed()
    out(f"threads={speed.set_threads(None)} images={args.images} repeats={args.repeats}")
    with tempfile.TemporaryDirectory() as scratch:
        latency_table(Path(scratch), args.repeats, out)
        prediction_throughput(Path(scratch), args.images, out)
    write_result("inference", "Inference: onnxruntime against torch eager, and predict_flow.py", out.block())


if __name__ == "__main__":
    main()
