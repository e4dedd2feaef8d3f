"""FashionMNIST and MNIST: torchvision's raw files under the data folder, downloaded and checked
when missing, from torchvision's mirrors or the user's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import Field

from common.path_settings import FILE_URL
from common.redaction import redact_url
from tasks.data.images import ImageData
from tasks.data.mnist_files import RAW_FILES, load_mnist_family, raw_files_stamp
from tasks.data.source_base import MemorySource


class MnistFamilySource(MemorySource):
    """28x28 grey images in ten classes, in torchvision's raw files."""

    torchvision_name: ClassVar[str]  # torchvision's class, and the folder under the data folder
    first_mirror: ClassVar[str]  # torchvision's first mirror (a test keeps them equal)

    mirror: Annotated[Optional[str], FILE_URL] = Field(
        None,
        pattern=r"^(https?|file)://",
        description="Base URL to download the original .gz files from, instead of torchvision's mirrors.",
    )

    def load(self, data_dir: Path) -> ImageData:
        return load_mnist_family(self.torchvision_name, data_dir, self.mirror)

    def made_from(self, data_dir: Path) -> object:
        return raw_files_stamp(self.torchvision_name, data_dir)

    def origins(self) -> tuple[str, str]:
        # an origin reaches MLflow: a mirror's credentials stay out of it
        base = redact_url(self.mirror).rstrip("/") + "/" if self.mirror else self.first_mirror
        train_images, _, test_images, _ = RAW_FILES
        return f"{base}{train_images}.gz", f"{base}{test_images}.gz"


class FashionMnistSource(MnistFamilySource):
    """Zalando's FashionMNIST: 70,000 photos of ten kinds of garment, downloaded once."""

    torchvision_name: ClassVar[str] = "FashionMNIST"
    first_mirror: ClassVar[str] = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

    name: Literal["fashion-mnist"] = "fashion-mnist"


class MnistSource(MnistFamilySource):
    """MNIST: 70,000 handwritten digits, downloaded once."""

    torchvision_name: ClassVar[str] = "MNIST"
    first_mirror: ClassVar[str] = "https://ossci-datasets.s3.amazonaws.com/mnist/"

    name: Literal["mnist"] = "mnist"
