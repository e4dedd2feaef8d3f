import torch

from tasks.publish.plots import mosaic, plot_confusion_matrix, plot_learning_curves, plot_misclassified

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


def test_mosaic_tiles_the_images_in_rows_with_a_gap_for_titles():
    images = torch.arange(5 * 3 * 6 * 4, dtype=torch.int32).reshape(5, 3, 6, 4).remainder(250).to(torch.uint8)
    grid, gap = mosaic(images, columns=2)
    assert gap == 2 and grid.shape == (gap + 3 * (6 + gap), gap + 2 * (4 + gap), 3)
    for tile, image in enumerate(images):
        row, column = divmod(tile, 2)
        top, left = gap + row * (6 + gap), gap + column * (4 + gap)
        assert (grid[top : top + 6, left : left + 4] == image.permute(1, 2, 0).numpy()).all()
    assert (grid[:gap] == 255).all() and (grid[-(6 + gap) :, -(4 + gap) :] == 255).all()  # gap, empty tile
    grey, _ = mosaic(images[:, :1], columns=5)
    assert grey.shape == (gap + 6 + gap, gap + 5 * (4 + gap))
