"""The in-memory form every dataset source produces."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ImageData(NamedTuple):
    """uint8 images (N, C, H, W) with int64 labels, for both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]


def check_image_data(data: ImageData) -> ImageData:
    """Raises ValueError when shapes, dtypes or labels are inconsistent."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{split} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{split} split has {len(images)} images and {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= len(data.class_names):
            raise ValueError(f"{split} labels must lie in [0, {len(data.class_names)})")
    train_shape, test_shape = tuple(data.train_images.shape[1:]), tuple(data.test_images.shape[1:])
    if train_shape != test_shape:
        raise ValueError(f"train images are {train_shape}, test images {test_shape}")
    return data
