import pandas as pd
import pytest
import torch

from tasks.publish.evaluation import confusion_matrix, metric_safe, per_class_table, summarise


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_per_class_precision_recall_f1_by_hand():
    matrix = torch.tensor([[3, 1], [2, 4]])
    table = per_class_table(matrix, ("a", "b"))
    assert table["precision"].tolist() == pytest.approx([3 / 5, 4 / 5])
    assert table["recall"].tolist() == pytest.approx([3 / 4, 4 / 6])
    assert table["f1"][0] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert table["support"].tolist() == [4, 6]


def test_class_never_predicted_gets_zero_not_nan():
    table = per_class_table(torch.tensor([[2, 0], [1, 0]]), ("a", "b"))
    assert table.loc[1, ["precision", "recall", "f1"]].tolist() == [0.0, 0.0, 0.0]


def test_summary_metrics_and_keys():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    metrics, table, matrix = summarise(logits, torch.tensor([0, 1, 1]), ("T-shirt/top", "Bag"))
    assert metrics["test_accuracy"] == pytest.approx(2 / 3)
    assert metrics["test_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])).item()
    )
    assert {"test_precision_0_T-shirt_top", "test_recall_1_Bag", "test_f1_1_Bag"} <= set(metrics)
    assert isinstance(table, pd.DataFrame) and matrix.sum() == 3


def test_metric_safe_names():
    assert metric_safe("T-shirt/top") == "T-shirt_top" and metric_safe("???") == "class"
