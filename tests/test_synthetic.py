from pathlib import Path

from tasks.data.offline_data import SYNTHETIC_CLASSES
from tasks.data.sources import SyntheticSource


def test_synthetic_data_is_the_same_each_time_and_names_its_generator():
    source = SyntheticSource()
    first, second = source.load(Path("unused")), source.load(Path("unused"))
    assert first.class_names == SYNTHETIC_CLASSES and (first.train_images == second.train_images).all()
    assert source.origins() == ("tasks.data.offline_data.make_synthetic",) * 2
    assert source.default_augment(1) == "none"
