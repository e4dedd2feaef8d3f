"""What a test set says of a model: accuracy and loss, per-class precision/recall/F1 and the
confusion matrix (summarise; tasks.publish.steps wraps it as evaluate-model)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Evaluation:
    """Test metrics (flat, MLflow-ready), the per-class table as rows, when the metrics were
    logged (milliseconds), so linking them to logged models later adds no second value, and the
    fp32 logits of the test split, which the ONNX check compares against."""

    metrics: dict[str, float]
    per_class: list[dict]
    logged_at: int
    logits: torch.Tensor


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class, predicted class) pairs; rows are true classes."""
    pairs = labels.long() * num_classes + predictions.long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_table(matrix: torch.Tensor, class_names: tuple[str, ...]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class; 0 where a ratio is undefined."""
    true_positive = matrix.diag().double()
    predicted = matrix.sum(0).double()
    support = matrix.sum(1).double()
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), 0.0)
    recall = torch.where(support > 0, true_positive / support.clamp_min(1), 0.0)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0
    )
    return pd.DataFrame(
        {
            "class_index": range(len(class_names)),
            "class_name": class_names,
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "f1": f1.numpy(),
            "support": support.long().numpy(),
        }
    )


def summarise(
    logits: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...]
) -> tuple[dict, pd.DataFrame, torch.Tensor]:
    """Test metrics (flat, MLflow-ready), the per-class table and the confusion matrix."""
    matrix = confusion_matrix(logits.argmax(1), labels, len(class_names))
    table = per_class_table(matrix, class_names)
    metrics = {
        "test_accuracy": (logits.argmax(1) == labels).double().mean().item(),
        "test_loss": F.cross_entropy(logits, labels).item(),
        "test_macro_f1": float(table["f1"].mean()),
    }
    for row in table.itertuples():
        key = f"{row.class_index}_{metric_safe(row.class_name)}"  # the index keeps keys unique
        metrics.update(
            {
                f"test_precision_{key}": row.precision,
                f"test_recall_{key}": row.recall,
                f"test_f1_{key}": row.f1,
            }
        )
    return metrics, table, matrix


def metric_safe(name: str) -> str:
    """A class name as MLflow accepts it in a metric key: 'T-shirt/top' -> 'T-shirt_top'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"
