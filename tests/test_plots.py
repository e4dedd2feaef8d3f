import torch

from tasks.publish.plots import plot_confusion_matrix, plot_learning_curves, plot_misclassified

PNG = b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(torch.tensor([[5, 1], [0, 7]]), ("a", "b"), tmp_path / "cm.png")
    assert path.read_bytes()[:8] == PNG


def test_learning_curves_png(tmp_path):
    history = [
        {"train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5, "val_accuracy": 0.6}
        for epoch in range(1, 4)
    ]
    assert plot_learning_curves(history, tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_misclassified_grid_for_grey_rgb_and_none_wrong(tmp_path):
    labels = torch.tensor([0, 1, 1, 0])
    for channels in (1, 3):
        images = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8)
        path = plot_misclassified(images, labels, torch.tensor([1, 1, 0, 0]), ("a", "b"), tmp_path / "m.png")
        assert path.read_bytes()[:8] == PNG
    none_wrong = plot_misclassified(images, labels, labels, ("a", "b"), tmp_path / "none.png")
    assert none_wrong.read_bytes()[:8] == PNG
