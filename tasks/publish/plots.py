"""The run's PNG plots: confusion matrix, learning curves and misclassified test images."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.files import atomic_path  # noqa: E402


def plot_confusion_matrix(matrix: torch.Tensor, class_names: tuple[str, ...], path: Path) -> Path:
    """Saves a labelled heat map of the confusion matrix as a PNG."""
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix.numpy(), cmap="Blues")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(class_names) <= 30:  # beyond that the counts are unreadable
        threshold = matrix.max().item() / 2
        for row, col in itertools.product(ticks, ticks):
            count = matrix[row, col].item()
            colour = "white" if count > threshold else "black"
            axes.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    return _save(figure, path)


def plot_learning_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Train and validation loss (left) and accuracy (right) per epoch."""
    epochs = range(1, len(history) + 1)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            axis.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    return _save(figure, path)


def plot_misclassified(
    images: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    class_names: tuple[str, ...],
    path: Path,
    limit: int = 24,
) -> Path:
    """A grid of the first `limit` misclassified images (uint8 N, C, H, W), titled true -> predicted."""
    wrong = (predictions != labels).nonzero().flatten()[:limit].tolist()
    if not wrong:
        figure = plt.figure(figsize=(4, 0.6))
        figure.text(0.5, 0.5, "no misclassified test images", ha="center", va="center", fontsize=9)
        return _save(figure, path, tight=False)
    # One image of all the tiles, titled in the gaps: two dozen axes, one per image, took four
    # times as long to draw.
    columns = min(6, len(wrong))
    grid, gap = mosaic(images[wrong], columns)
    width, title_height = 1.6 * columns, 0.4
    height = width * grid.shape[0] / grid.shape[1] + title_height
    figure = plt.figure(figsize=(width, height))
    axes = figure.add_axes((0, 0, 1, 1 - title_height / height))
    axes.axis("off")
    axes.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255)
    size_y, size_x = images.shape[-2:]
    for tile, index in enumerate(wrong):
        top, left = _tile_origin(tile, columns, (size_y, size_x), gap)
        label = f"{class_names[labels[index]]} -> {class_names[predictions[index]]}"
        axes.text(
            left + size_x / 2, top - gap / 8, label, ha="center", va="bottom", fontsize=7, color="firebrick"
        )
    figure.suptitle(f"misclassified test images (first {len(wrong)}, true -> predicted)", fontsize=9)
    return _save(figure, path, tight=False)


def mosaic(images: torch.Tensor, columns: int) -> tuple[np.ndarray, int]:
    """uint8 (N, C, H, W) images tiled row by row on white, with a gap above each row for its
    titles; returns the (H', W') or (H', W', C) grid and the gap in pixels."""
    count, channels, size_y, size_x = images.shape
    rows, gap = -(-count // columns), max(2, size_y // 3)
    grid = np.full((gap + rows * (size_y + gap), gap + columns * (size_x + gap), channels), 255, np.uint8)
    for tile, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        top, left = _tile_origin(tile, columns, (size_y, size_x), gap)
        grid[top : top + size_y, left : left + size_x] = image
    return (grid.squeeze(-1) if channels == 1 else grid), gap


def _tile_origin(tile: int, columns: int, size: tuple[int, int], gap: int) -> tuple[int, int]:
    """The (top, left) pixel of tile number `tile` in a mosaic of (height, width) `size` tiles."""
    row, column = divmod(tile, columns)
    return gap + row * (size[0] + gap), gap + column * (size[1] + gap)


def _save(figure: plt.Figure, path: Path, tight: bool = True) -> Path:
    """Writes the figure atomically (OutputWriteError naming `path` if that fails) and closes it."""
    try:
        if tight:
            figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))  # not from the temporary's name
    finally:
        plt.close(figure)
    return path
