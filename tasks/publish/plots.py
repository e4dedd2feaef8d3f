"""The run's PNG plots: confusion matrix, learning curves and misclassified test images."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tasks.files import atomic_path  # noqa: E402


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
    columns = min(6, max(1, len(wrong)))
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.4), squeeze=False)
    # Fixed spacing: tight_layout over two dozen axes costs more than the drawing itself.
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / (1.8 * rows + 0.4), hspace=0.35)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        image = images[index].permute(1, 2, 0).squeeze(-1).numpy()
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        true, predicted = class_names[labels[index]], class_names[predictions[index]]
        axis.set_title(f"{true} -> {predicted}", fontsize=7, color="firebrick")
    if not wrong:
        axes[0, 0].text(0, 0.5, "no misclassified test images", fontsize=9)
    figure.suptitle(f"misclassified test images (first {len(wrong)}, true -> predicted)", fontsize=9)
    return _save(figure, path, tight=False)


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
