"""A 60,000/10,000 set of 28x28 digits in FashionMNIST's file format, for benchmarks offline.

scikit-learn's 1,797 real 8x8 digits, upscaled, rotated, scaled, shifted, blurred and noised.
Training and test images come from disjoint writers' digits (a fixed 80/20 split of the
source), so test accuracy measures generalisation, not memory. The files land where the
pipeline looks for FashionMNIST (`DATA_DIR/FashionMNIST/raw/`), so
`python flows/train_flow.py --data-dir DATA_DIR` trains on them as it would on the real set.

    python benchmarks/digits60k.py DATA_DIR [--train 60000] [--test 10000]
"""

from __future__ import annotations

import argparse
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

_SEED = 20261128
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _source_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.as_tensor(
        bunch.target
    )


def _distort(sources: torch.Tensor, labels: torch.Tensor, count: int, generator: torch.Generator):
    """`count` random affine copies of `sources` at 28x28, with blur, contrast and noise."""
    pick = torch.randint(len(sources), (count,), generator=generator)
    big = F.interpolate(sources, size=(20, 20), mode="bicubic", align_corners=False).clamp(0, 1)
    canvas = F.pad(big, (4, 4, 4, 4))  # 20x20 digits centred on 28x28, as in MNIST
    angle = (torch.rand(count, generator=generator) - 0.5) * math.radians(30)
    scale = 0.85 + 0.3 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) - 0.5) * 0.3  # up to ~2 px each way
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    images = torch.empty(count, 1, 28, 28)
    for start in range(0, count, 8192):  # bounded memory
        part = slice(start, start + 8192)
        grid = F.affine_grid(theta[part], [len(theta[part]), 1, 28, 28], align_corners=False)
        images[part] = F.grid_sample(canvas[pick[part]], grid, align_corners=False)
    contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
    images = images * contrast + 0.12 * torch.randn(images.shape, generator=generator)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1), labels[pick]


def make_digits60k(train: int = 60000, test: int = 10000) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels); the same every time."""
    images, labels = _source_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SEED))
    cut = round(len(labels) * 0.8)
    generator = torch.Generator().manual_seed(_SEED)
    train_images, train_labels = _distort(images[order[:cut]], labels[order[:cut]], train, generator)
    test_images, test_labels = _distort(images[order[cut:]], labels[order[cut:]], test, generator)
    return train_images, train_labels, test_images, test_labels


def _idx_bytes(tensor: torch.Tensor) -> bytes:
    """The original MNIST file format: magic, big-endian dims, raw uint8 data."""
    header = struct.pack(">I", 0x0800 | tensor.ndim) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_digits60k(data_dir: Path, train: int = 60000, test: int = 10000) -> Path:
    """Writes the four files under `data_dir/FashionMNIST/raw/` unless they are there; returns data_dir."""
    raw = data_dir / "FashionMNIST" / "raw"
    if all((raw / name).exists() for name in FILES):
        return data_dir
    raw.mkdir(parents=True, exist_ok=True)
    for name, tensor in zip(FILES, make_digits60k(train, test)):
        part = raw / (name + ".part")
        part.write_bytes(_idx_bytes(tensor))
        part.replace(raw / name)
    return data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--train", type=int, default=60000)
    parser.add_argument("--test", type=int, default=10000)
    args = parser.parse_args()
    print(write_digits60k(args.data_dir, args.train, args.test) / "FashionMNIST" / "raw")


if __name__ == "__main__":
    main()
