"""A sweep's results: the trial table, the best trial, and validation accuracy per swept setting."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.errors import UserError
from common.files import atomic_path  # noqa: E402

FINISHED, FAILED = "finished", "failed"
RESULT_COLUMNS = [
    "val_accuracy",
    "val_loss",
    "train_accuracy",
    "train_loss",
    "epochs",
    "train_seconds",
    "worker",
    "run_id",
    "error",
]


class SweepFailedError(UserError, RuntimeError):
    """Every trial of a sweep failed."""


def trials_table(outcomes: Sequence[dict], swept: Sequence[str]) -> pd.DataFrame:
    """One row per trial, in trial order: status, swept values, final metrics, where it ran."""
    table = pd.DataFrame(list(outcomes)).sort_values("trial", ignore_index=True)
    for column in RESULT_COLUMNS:
        if column not in table:
            table[column] = None
    return table[["trial", "status", *swept, *RESULT_COLUMNS]]


def best_trial(table: pd.DataFrame) -> pd.Series:
    """The finished trial with the highest val_accuracy, ties going to the lower val_loss."""
    finished = table[table["status"] == FINISHED]
    if finished.empty:
        errors = "; ".join(f"trial {row.trial}: {row.error}" for row in table.itertuples())
        raise SweepFailedError(f"all {len(table)} trials failed: {errors}")
    ranked = finished.sort_values(["val_accuracy", "val_loss"], ascending=[False, True], kind="stable")
    return ranked.iloc[0]


def plot_by_setting(table: pd.DataFrame, swept: Sequence[str], path: Path) -> Optional[Path]:
    """Validation accuracy against each swept setting, one panel each; None when nothing finished."""
    finished = table[table["status"] == FINISHED]
    if finished.empty:
        return None
    figure, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.6), squeeze=False)
    for ax, field in zip(axes[0], swept):
        values = finished[field]
        if pd.api.types.is_numeric_dtype(values):
            ax.scatter(values, finished["val_accuracy"])
            if values.min() > 0 and values.max() >= 10 * values.min():  # learning rates and the like
                ax.set_xscale("log")
        else:  # categories: one column of points each, in order of first appearance
            names = list(dict.fromkeys(table[field]))
            ax.scatter([names.index(v) for v in values], finished["val_accuracy"])
            ax.set_xticks(range(len(names)), names)
        ax.set_xlabel(field)
        ax.set_ylabel("val_accuracy")
        ax.grid(alpha=0.3)
    figure.suptitle("validation accuracy by setting (finished trials)")
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a failed write raises OutputWriteError naming `path`
            figure.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))
    finally:
        plt.close(figure)
    return path
