"""What every source shares (tasks.data.source_base) and the list of them (its __init__)."""

import pytest
import torch
from pydantic import ValidationError

from tasks.data.source_base import source_name
from tasks.data.sources import (
    MEMORY_SOURCES,
    SOURCES,
    CsvSource,
    DataSource,
    DigitsSource,
    MemorySource,
    PhotoSource,
    Shape,
    SyntheticSource,
    source_named,
)


def test_sources_are_picked_by_their_unique_names_the_default_first():
    names = [source_name(source) for source in SOURCES]
    assert names == ["fashion-mnist", "mnist", "csv", "folder", "synthetic", "digits"]
    assert MEMORY_SOURCES == tuple(s for s in SOURCES if issubclass(s, MemorySource))
    assert all(issubclass(s, (MemorySource, PhotoSource)) for s in SOURCES)
    assert source_named("digits") == DigitsSource()
    assert source_named("csv", train_csv="a", test_csv="b", image_root="r").train_csv == "a"
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose one of fashion-mnist, mnist, csv"):
        source_named("nope")
    with pytest.raises(TypeError):
        DataSource(name="x")  # the base says what a source does, not how


def test_sources_are_frozen_and_forbid_settings_of_other_sources():
    source = DigitsSource()
    with pytest.raises(ValidationError, match="frozen"):
        source.name = "mnist"
    with pytest.raises(ValidationError, match="mirror"):
        DigitsSource(mirror="https://mirror.example/")


def test_a_setting_two_sources_share_is_one_field():
    seen = {}
    for source in SOURCES:
        for name, field in source.model_fields.items():
            if name != "name":
                first = seen.setdefault(name, field)
                assert (field.annotation, field.default, field.description) == (
                    first.annotation,
                    first.default,
                    first.description,
                ), f"{source.__name__}.{name}"


def test_shape_takes_the_images_own_size_and_colour_unless_asked():
    assert Shape().resolve(frozenset({(28, 28)}), False) == Shape("1", (28, 28)).resolve(frozenset(), True)
    mixed = frozenset({(20, 30), (40, 40)})
    assert Shape(fallback=64).resolve(mixed, True).size == (64, 64)
    assert Shape(resize_mode="pad").resolve(mixed, True).channels == 3


def test_a_generated_sources_plan_has_no_key_and_reads_only_when_asked(tmp_path, monkeypatch):
    plan = SyntheticSource().plan(tmp_path, Shape("3"), 1, None)
    assert plan.key() is None  # generated again each time: nothing to reuse a prepared copy by
    assert plan.origins == ("tasks.data.offline_data.make_synthetic",) * 2
    contents = plan.contents()
    assert contents.prep.channels == 3 and contents.prep.size == (28, 28)
    assert len(contents.class_names) == 10 and len(contents.train_labels) == 6000


def test_a_photo_sources_plan_lists_now_and_keys_by_listing_and_preprocessing(png_dataset, tmp_path):
    source = CsvSource(**png_dataset)
    plan = source.plan(tmp_path, Shape(), 1, None)
    assert plan.key() == plan.key() == source.plan(tmp_path, Shape(), 2, None).key()
    assert plan.key() != source.plan(tmp_path, Shape(size=(8, 8)), 1, None).key()
    assert plan.origins == (str(png_dataset["train_csv"]), str(png_dataset["test_csv"]))
    assert plan.contents().prep.size == (12, 12)
    assert torch.equal(plan.contents().test_labels, torch.tensor([0, 1] * 6))
