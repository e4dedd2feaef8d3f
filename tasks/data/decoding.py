"""The one path from an image file to model pixels, shared by dataset preparation, evaluation, batch
prediction and serving, so a photo of any size or mode gives the same uint8 pixels in all of them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin
from torchvision.transforms.v2 import functional as F

from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, check_image_file

RESIZE_MODES = ("crop", "pad", "stretch")
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # PNG's 16-bit grey, as Pillow opens it
_GREY_MODES = frozenset({"1", "L", "LA", "La"}) | _SIXTEEN_BIT
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image a quarter
_EXIF_ORIENTATION = 0x0112
# What Pillow's plugins raise on damaged or hostile files, besides OSError.
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, IndexError, TypeError, struct.error)
_DECODE_ERRORS += (Image.DecompressionBombError,)  # over twice PIL's own pixel limit


@dataclass(frozen=True)
class Preprocessing:
    """What every image becomes before the network sees it; stored with the model."""

    channels: int  # 1 or 3
    size: tuple[int, int]  # (height, width)
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        if isinstance(self.size, list):  # as JSON gives it back; a list would not hash
            object.__setattr__(self, "size", tuple(self.size))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if not _is_size(self.size):
            raise ValueError(f"size must be two positive integers (height, width), got {self.size!r}")
        if self.resize_mode not in RESIZE_MODES:
            accepted = ", ".join(RESIZE_MODES)
            raise ValueError(f"resize_mode must be one of {accepted}, got {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form, for MLflow model metadata."""
        return {"channels": self.channels, "size": list(self.size), "resize_mode": self.resize_mode}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """The inverse of `to_dict`."""
        return cls(int(data["channels"]), tuple(data["size"]), str(data.get("resize_mode", "crop")))


def _is_size(value: object) -> bool:
    """Whether `value` is a (height, width) of positive integers."""
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value)
    )


def decode_image_file(
    path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, target: Optional[Preprocessing] = None
) -> torch.Tensor:
    """uint8 (C, H, W) as a viewer shows the file (EXIF orientation applied, first frame only), with
    C = 1 for grey sources and 3 otherwise; transparent pixels are composited on white. With a
    `target`, a JPEG may be decoded at a reduced scale, never below what `preprocess` resizes to."""
    header = check_image_file(path, max_pixels)
    try:
        # Only the decoder the header check judged the file for; PIL would otherwise try them all.
        with Image.open(path, formats=[header.format.upper()]) as image:
            if target is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                _draft(image, target)
            return _pixels(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as error:
        raise ImageFileError(f"it cannot be decoded: {error}") from error


def _draft(image: JpegImagePlugin.JpegImageFile, target: Preprocessing) -> None:
    """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale while each side stays at least the size that
    `preprocess` will resize to, so that resize only ever shrinks."""
    width, height = image.size
    swapped = image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS
    shown = (width, height) if swapped else (height, width)  # (height, width) as a viewer shows it
    need_height, need_width = resized_size(shown, target)
    need = (need_height, need_width) if swapped else (need_width, need_height)  # back to file axes
    # No colour conversion in libjpeg: grey always comes from preprocess, with or without a target.
    image.draft("L" if image.mode == "L" else "RGB", need)


def _pixels(image: Image.Image) -> torch.Tensor:
    """uint8 (C, H, W) from a loaded image of any mode Pillow yields for PNG, JPEG, GIF or WebP."""
    image = _standard_mode(image)
    if image.mode in _SIXTEEN_BIT:
        return _sixteen_to_eight(np.asarray(image))[None].contiguous()
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = (pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)).contiguous()
    return _on_white(pixels) if image.mode in ("LA", "RGBA") else pixels


def _standard_mode(image: Image.Image) -> Image.Image:
    """The image as L, LA, RGB, RGBA or 16-bit grey; a PNG or GIF transparent colour becomes alpha."""
    if image.mode in _SIXTEEN_BIT:
        return image
    alpha = image.mode in _ALPHA_MODES or image.info.get("transparency") is not None
    wanted = ("L" if image.mode in _GREY_MODES else "RGB") + ("A" if alpha else "")
    return image if image.mode == wanted else image.convert(wanted)  # CMYK, P, YCbCr, 1, ...


def _sixteen_to_eight(values: np.ndarray) -> torch.Tensor:
    """Scales 16-bit values to 8 bits: round(v * 255 / 65535), which is round(v / 257)."""
    wide = torch.from_numpy(values.astype(np.int64)).clamp(0, 65535)
    return ((wide + 128) // 257).to(torch.uint8)


def _on_white(pixels: torch.Tensor) -> torch.Tensor:
    """Composites (C + alpha, H, W) on white, in integers so every platform rounds alike."""
    colour, alpha = pixels[:-1].to(torch.int32), pixels[-1:].to(torch.int32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).to(torch.uint8)


def resized_size(shape: tuple[int, int], prep: Preprocessing) -> tuple[int, int]:
    """(height, width) an image of `shape` (height, width) is resized to before crop or pad."""
    (height, width), (target_height, target_width) = shape, prep.size
    if prep.resize_mode == "stretch":
        return prep.size
    if prep.resize_mode == "crop":  # cover the target, so a centre crop fills it
        scale = max(target_height / height, target_width / width)
        return max(target_height, round(height * scale)), max(target_width, round(width * scale))
    scale = min(target_height / height, target_width / width)  # pad: fit inside the target
    return (
        min(target_height, max(1, round(height * scale))),
        min(target_width, max(1, round(width * scale))),
    )


def preprocess(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (C, H, W) to contiguous uint8 (prep.channels, *prep.size); an image already of that
    shape comes back unchanged. crop: cover then centre crop; pad: fit then black bars, centred;
    stretch: straight to the size. Resizing is bilinear with antialiasing."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected uint8 (1 or 3, H, W), got {image.dtype} {tuple(image.shape)}")
    if prep.channels == 1 and image.shape[0] == 3:  # before resizing: a third of the work
        image = F.rgb_to_grayscale(image)
    if tuple(image.shape[-2:]) != prep.size:
        image = _resize(image, prep)
    if prep.channels == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


def _resize(image: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Resizes (C, H, W) to prep.size by prep.resize_mode."""
    new_size = resized_size((image.shape[-2], image.shape[-1]), prep)
    if tuple(image.shape[-2:]) != new_size:
        image = F.resize(image, list(new_size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if prep.resize_mode == "crop":
        return F.center_crop(image, list(prep.size))
    if prep.resize_mode == "pad":
        extra_height, extra_width = prep.size[0] - new_size[0], prep.size[1] - new_size[1]
        left, top = extra_width // 2, extra_height // 2
        return F.pad(image, [left, top, extra_width - left, extra_height - top], fill=0)
    return image


def load_image(path: Path, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A file as the network sees it: uint8 (prep.channels, *prep.size)."""
    return preprocess(decode_image_file(path, max_pixels, prep), prep)
