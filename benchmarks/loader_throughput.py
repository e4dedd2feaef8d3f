"""Loader throughput: in-memory uint8 batches cut by index vs a torchvision-style PIL DataLoader.

Both iterate one shuffled epoch over the same 60,000 28x28 images (FashionMNIST's size) at the
same batch size and yield identical float batches in [0, 1]. Prints samples/s and the ratio, and
writes them to benchmarks/results/loader_throughput.md.

    python benchmarks/loader_throughput.py [--samples 60000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms.functional import to_tensor  # noqa: E402

from benchmarks.results_file import Printed, write_result  # noqa: E402
from tasks.data.loaders import TensorLoader  # noqa: E402


class PilDataset(Dataset):
    """What torchvision's FashionMNIST does per sample: uint8 -> PIL image -> ToTensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_tensor(Image.fromarray(self.images[index, 0].numpy(), mode="L")), int(self.labels[index])


def epoch_rate(loader) -> float:
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.samples, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.samples,), generator=generator)

    tensor = epoch_rate(TensorLoader(images, labels, args.batch_size, shuffle=True))
    pil = epoch_rate(DataLoader(PilDataset(images, labels), batch_size=args.batch_size, shuffle=True))
    out = Printed()
    out(f"samples={args.samples} batch_size={args.batch_size} threads={torch.get_num_threads()}")
    out(f"TensorLoader (uint8, index per batch): {tensor:12,.0f} samples/s")
    out(f"DataLoader (PIL + ToTensor per sample): {pil:12,.0f} samples/s")
    out(f"ratio: {tensor / pil:.1f}x")
    write_result(
        "loader_throughput", "Loader throughput: uint8 batches by index against a PIL DataLoader", out.block()
    )


if __name__ == "__main__":
    main()
