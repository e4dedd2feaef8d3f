"""Datasets that need no network: procedural `synthetic` and scikit-learn's `digits`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.data.images import ImageData

SYNTHETIC_CLASSES = tuple(f"pattern-{k}" for k in range(10))
DIGIT_CLASSES = tuple(str(k) for k in range(10))
_DATA_SEED = 20240601  # fixed, so the data (and its sha256) never depends on the run's seed


def make_synthetic(train_size: int = 6000, test_size: int = 1000, size: int = 28) -> ImageData:
    """Ten smooth random templates, each sample shifted, rescaled and noised; deterministic."""
    generator = torch.Generator().manual_seed(_DATA_SEED)
    noise = torch.rand(10, 1, size // 4, size // 4, generator=generator)
    templates = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    templates = (templates - templates.amin((2, 3), keepdim=True)) / templates.amax((2, 3), keepdim=True)

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % 10
        labels = labels[torch.randperm(count, generator=generator)]
        shifts = torch.randint(-2, 3, (count, 2), generator=generator)
        images = torch.stack(
            [templates[y].roll((int(dy), int(dx)), dims=(1, 2)) for y, (dy, dx) in zip(labels, shifts)]
        )
        contrast = 0.6 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
        images = images * contrast + 0.15 * torch.randn(images.shape, generator=generator)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_images, train_labels = sample(train_size)
    test_images, test_labels = sample(test_size)
    return ImageData(train_images, train_labels, test_images, test_labels, SYNTHETIC_CLASSES)


def load_digits(size: int = 28, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 1,797 real 8x8 handwritten digits, resized, with a fixed split."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when used

    bunch = sklearn_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DATA_SEED))
    test_count = round(len(labels) * test_fraction)
    test, train = order[:test_count], order[test_count:]
    return ImageData(images[train], labels[train], images[test], labels[test], DIGIT_CLASSES)
