import torch

from tasks.data.offline_data import DIGIT_CLASSES, SYNTHETIC_CLASSES, load_digits, make_synthetic


def test_synthetic_is_deterministic_balanced_and_28x28():
    first, second = make_synthetic(600, 100), make_synthetic(600, 100)
    assert torch.equal(first.train_images, second.train_images)
    assert first.train_images.shape == (600, 1, 28, 28) and first.train_images.dtype == torch.uint8
    assert torch.bincount(first.train_labels).tolist() == [60] * 10
    assert first.class_names == SYNTHETIC_CLASSES


def test_synthetic_classes_differ_more_between_than_within():
    data = make_synthetic(1000, 10)
    means = torch.stack([data.train_images[data.train_labels == k].float().mean(0) for k in range(10)])
    assert (means[0] - means[1]).abs().mean() > 10


def test_digits_are_real_resized_with_a_fixed_split():
    data, again = load_digits(), load_digits()
    assert data.train_images.shape[1:] == (1, 28, 28)
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert torch.equal(data.test_labels, again.test_labels)
    assert data.class_names == DIGIT_CLASSES
    assert set(data.test_labels.tolist()) == set(range(10))
