"""scikit-learn's bundled handwritten digits: real data with no network needed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tasks.data.images import ImageData
from tasks.data.offline_data import load_digits
from tasks.data.source_base import MemorySource, function_origin


class DigitsSource(MemorySource):
    """1,797 real 8x8 handwritten digits, resized to 28x28 grey, with a fixed test split."""

    name: Literal["digits"] = "digits"

    def load(self, data_dir: Path) -> ImageData:
        return load_digits()

    def origins(self) -> tuple[str, str]:
        return (function_origin(load_digits),) * 2
