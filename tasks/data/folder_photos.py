"""Your own photos in torchvision's ImageFolder layout: one subfolder per class."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.path_settings import OptionalPathText, PathText, resolve_path
from tasks.data.photos import Listing, list_folder
from tasks.data.source_base import PhotoSource


class FolderSource(PhotoSource):
    """A class-folder tree (the sorted subfolder names are the classes), with a test tree or a
    stratified share of it held out."""

    name: Literal["folder"] = "folder"
    train_dir: PathText = Field(description="One subfolder of images per class (the names are the classes).")
    test_dir: OptionalPathText = Field(
        None,
        description="Test images in the same layout; default: a stratified --test-fraction of --train-dir.",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Without --test-dir: share of each class held out for test."
    )

    def list_photos(self) -> Listing:
        test_dir = resolve_path(self.test_dir) if self.test_dir else None
        return list_folder(
            resolve_path(self.train_dir), test_dir, self.test_fraction, max_pixels=self.max_image_pixels
        )
