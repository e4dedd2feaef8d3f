from pathlib import Path

from tasks.data.offline_data import DIGIT_CLASSES
from tasks.data.sources import DigitsSource


def test_digits_load_without_network_and_name_their_generator():
    source = DigitsSource()
    data = source.load(Path("unused"))
    assert data.class_names == DIGIT_CLASSES and data.train_images.shape[1:] == (1, 28, 28)
    assert source.origins() == ("tasks.data.offline_data.load_digits",) * 2
    assert source.made_from(Path("unused")) is None and source.default_augment(1) == "none"
