"""The data sources a run can train on, one class per source (tasks.data.source_base says what a
source owns). A new source is a module here, its line in SOURCES, and its test."""

from __future__ import annotations

from tasks.data.csv_photos import CsvSource
from tasks.data.digits import DigitsSource
from tasks.data.folder_photos import FolderSource
from tasks.data.mnist_family import FashionMnistSource, MnistSource
from tasks.data.source_base import DataSource, MemorySource, PhotoSource, Shape, source_name
from tasks.data.synthetic import SyntheticSource

# In the order --dataset lists them; the first is the default.
SOURCES: tuple[type[DataSource], ...] = (
    FashionMnistSource,
    MnistSource,
    CsvSource,
    FolderSource,
    SyntheticSource,
    DigitsSource,
)
MEMORY_SOURCES = tuple(source for source in SOURCES if issubclass(source, MemorySource))

__all__ = [
    "MEMORY_SOURCES",
    "SOURCES",
    "CsvSource",
    "DataSource",
    "DigitsSource",
    "FashionMnistSource",
    "FolderSource",
    "MemorySource",
    "MnistSource",
    "PhotoSource",
    "Shape",
    "SyntheticSource",
    "source_named",
]


def source_named(name: str, **settings: object) -> DataSource:
    """The source `name` with `settings`, checked (pydantic's ValidationError names a bad one)."""
    classes = {source_name(source): source for source in SOURCES}
    if name not in classes:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(classes)}")
    return classes[name](**settings)
