import pytest

from tasks.data.csv_images import CsvDatasetError
from tasks.data.sources import CsvSource


def test_paths_are_kept_as_given_and_read_from_the_working_directory(png_dataset, monkeypatch):
    monkeypatch.chdir(png_dataset["image_root"])
    source = CsvSource(train_csv="train.csv", test_csv="test.csv", image_root=".", classes=["right", "left"])
    assert source.train_csv == "train.csv"
    listing = source.list_photos()
    assert listing.train_origin == str(png_dataset["train_csv"]) and listing.class_names == ("right", "left")
    assert len(listing.train[0]) == 36 and listing.test[1][:2] == (1, 0)


def test_the_pixel_limit_is_a_setting_of_the_source(png_dataset):
    with pytest.raises(CsvDatasetError, match="over the limit of 143"):
        CsvSource(**png_dataset, max_image_pixels=143).list_photos()
    assert len(CsvSource(**png_dataset, max_image_pixels=144).list_photos().train[0]) == 36


def test_colour_photos_augment_by_default_and_grey_ones_do_not():
    source = CsvSource(train_csv="a", test_csv="b", image_root="r")
    assert (source.default_augment(3), source.default_augment(1)) == ("standard", "none")
