import numpy as np
import torch
from PIL import Image

from tasks.publish.plots import mosaic, plot_confusion_matrix, plot_learning_curves, plot_misclassified

PNG = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # train, val


def pixels(path) -> np.ndarray:
    """The PNG at `path` as an (H, W, 3) int array, after checking it is one."""
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def colour_mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.abs(image - colour).sum(-1) < 30


def red_mask(image: np.ndarray) -> np.ndarray:
    """The misclassified grid's titles (firebrick, antialiased): red well above green and blue."""
    return image[..., 0] - image[..., 1:].max(-1) > 60


def test_confusion_matrix_is_a_square_plot_sized_by_the_classes_that_shows_the_counts(tmp_path):
    image = pixels(plot_confusion_matrix(torch.tensor([[5, 1], [0, 7]]), ("a", "b"), tmp_path / "cm.png"))
    assert image.shape == (400, 400, 3)  # 4 x 4 inches at 100 dpi, the smallest size
    assert (image == 255).all(-1).mean() < 0.9 and image.std() > 20  # drawn on, not blank
    swapped = pixels(plot_confusion_matrix(torch.tensor([[1, 5], [7, 0]]), ("a", "b"), tmp_path / "sw.png"))
    assert (image != swapped).any(-1).mean() > 0.05  # other counts, another picture
    classes = tuple("abcdefghijkl")
    larger = pixels(plot_confusion_matrix(torch.eye(12, dtype=torch.long), classes, tmp_path / "cm12.png"))
    assert larger.shape == (920, 920, 3)  # 0.6 inch per class and 2 for the labels


def test_learning_curves_have_a_loss_and_an_accuracy_panel_each_with_both_splits(tmp_path):
    history = [
        {"train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "train_accuracy": 0.5, "val_accuracy": 0.6}
        for epoch in range(1, 4)
    ]
    image = pixels(plot_learning_curves(history, tmp_path / "curves.png"))
    assert image.shape == (350, 900, 3)
    left, right = image[:, :450], image[:, 450:]
    for panel in (left, right):
        assert colour_mask(panel, BLUE).sum() > 100 and colour_mask(panel, ORANGE).sum() > 100
    flat = [dict(row, train_loss=0.5, val_loss=0.5) for row in history]
    other = pixels(plot_learning_curves(flat, tmp_path / "flat.png"))
    assert (other != image).any(-1).mean() > 0.01  # other losses, another picture


def test_misclassified_grid_has_a_tile_and_title_per_wrong_image_for_grey_and_rgb(tmp_path):
    labels = torch.tensor([0, 1, 1, 0])
    wrong_two = torch.tensor([1, 1, 0, 0])  # images 0 and 2
    for channels in (1, 3):
        images = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8)
        image = pixels(
            plot_misclassified(images, labels, wrong_two, ("a", "b"), tmp_path / f"m{channels}.png")
        )
        assert image.shape == (214, 320, 3)  # two 1.6-inch columns, one row, the title strip
        titles = red_mask(image)
        assert titles[:, :160].sum() > 10 and titles[:, 160:].sum() > 10  # "a -> b" over each tile
        coloured = (image.max(-1) - image.min(-1)) > 40
        assert (coloured.sum() > 10_000) == (channels == 3)  # two ~116-pixel square tiles; grey stays grey
    ten = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    zeros, ones = torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)
    grid = pixels(plot_misclassified(ten, zeros, ones, ("a", "b"), tmp_path / "ten.png"))
    assert grid.shape == (380, 960, 3)  # six columns, two rows
    none_wrong = pixels(plot_misclassified(images, labels, labels, ("a", "b"), tmp_path / "none.png"))
    assert none_wrong.shape == (60, 400, 3) and not red_mask(none_wrong).any()
    assert (none_wrong < 128).any()  # the sentence saying so


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
