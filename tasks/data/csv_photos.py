"""Your own photos named by two CSVs: the notes' CustomImageDataset."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from common.path_settings import PathText, resolve_path
from tasks.data.photos import Listing, list_csv
from tasks.data.source_base import PhotoSource


class CsvSource(PhotoSource):
    """Two CSVs of (image path under an image root, label); integer or string labels."""

    name: Literal["csv"] = "csv"
    train_csv: PathText = Field(description="CSV of training images (path relative to --image-root, label).")
    test_csv: PathText = Field(description="CSV of test images, same format.")
    image_root: PathText = Field(description="Folder the CSV paths are relative to.")
    classes: Optional[list[str]] = Field(
        None,
        description="The label set in index order (comma-separated on the command line); default: the "
        "labels of the training CSV.",
    )

    def list_photos(self) -> Listing:
        return list_csv(
            resolve_path(self.train_csv),
            resolve_path(self.test_csv),
            resolve_path(self.image_root),
            self.classes,
            self.max_image_pixels,
        )
