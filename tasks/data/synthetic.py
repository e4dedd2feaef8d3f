"""Procedural patterns: deterministic, learnable in seconds, and no network or file needed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tasks.data.images import ImageData
from tasks.data.offline_data import make_synthetic
from tasks.data.source_base import MemorySource, function_origin


class SyntheticSource(MemorySource):
    """Ten smooth random templates, each sample shifted, rescaled and noised (28x28 grey)."""

    name: Literal["synthetic"] = "synthetic"

    def load(self, data_dir: Path) -> ImageData:
        return make_synthetic()

    def origins(self) -> tuple[str, str]:
        return (function_origin(make_synthetic),) * 2
