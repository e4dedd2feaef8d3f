"""The one path from an image file to model pixels, shared by dataset preparation, evaluation, batch
prediction and serving, so a photo of any size or mode gives the same uint8 pixels in all of them."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin
from torchvision.transforms.v2 import functional as F

from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, check_image_file, open_image
from tasks.data.sixteen_bit import on_white, png_bit_depth, sixteen_bit_png

RESIZE_MODES = ("crop", "pad", "stretch")
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image a quarter
_EXIF_ORIENTATION = 0x0112
# What Pillow's plugins raise on damaged or hostile files, besides OSError.
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, IndexError, TypeError, struct.error)
_DECODE_ERRORS += (Image.DecompressionBombError,)  # over twice PIL's own pixel limit
_PREMULTIPLIED = {"LA": "La", "RGBA": "RGBa"}  # reduce averages colour weighted by its alpha
# Box-reduce only while at least this many times the size that resize then shrinks to: the result
# is then indistinguishable from resizing the whole image (Pillow's reducing_gap for thumbnail).
_REDUCING_GAP = 3


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
    source: Union[str, os.PathLike, BinaryIO],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target: Optional[Preprocessing] = None,
) -> torch.Tensor:
    """uint8 (C, H, W) as a viewer shows the file (EXIF orientation applied), with C = 1 for grey
    sources and 3 otherwise; transparent pixels are composited on white. Animated GIF, WebP and PNG:
    first frame only, decoded as such (the header check judges that frame's size). `source` is a
    path, opened once (open_image), or an open binary file; the header is checked and the image
    decoded from that one open file. With a `target`, the image may be decoded (JPEG) or reduced
    (box average) to an integer fraction of its size, never below what `preprocess` resizes to, so
    a large photo never becomes full-size tensors."""
    if isinstance(source, (str, os.PathLike)):
        with open_image(Path(source)) as handle:
            return _decode(handle, max_pixels, target).contiguous()
    return _decode(source, max_pixels, target).contiguous()


def _decode(handle: BinaryIO, max_pixels: int, target: Optional[Preprocessing]) -> torch.Tensor:
    """decode_image_file's pixels, possibly a non-contiguous view."""
    header = check_image_file(handle, max_pixels)
    try:
        if header.format == "PNG" and png_bit_depth(handle) == 16:
            return sixteen_bit_png(handle)
        # Only the decoder the header check judged the file for; PIL would otherwise try them all.
        with Image.open(handle, formats=[header.format.upper()]) as opened:
            if target is not None and isinstance(opened, JpegImagePlugin.JpegImageFile):
                _draft(opened, target)
            image = _standard_mode(opened)
            if target is not None:
                image = _reduce(image, target)
            ImageOps.exif_transpose(image, in_place=True)
            return _pixels(image)
    except _DECODE_ERRORS as error:
        raise ImageFileError(f"it cannot be decoded: {error}") from error


def _draft(image: JpegImagePlugin.JpegImageFile, target: Preprocessing) -> None:
    """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale while each side stays at least the size that
    `preprocess` will resize to, so that resize only ever shrinks."""
    # No colour conversion in libjpeg: grey always comes from preprocess, with or without a target.
    image.draft("L" if image.mode == "L" else "RGB", _needed(image, target))


def _reduce(image: Image.Image, target: Preprocessing) -> Image.Image:
    """The image shrunk by the largest integer factor that keeps each side at least _REDUCING_GAP
    times what `preprocess` resizes to (box average; alpha premultiplied, as compositing weighs it)."""
    need_width, need_height = _needed(image, target)
    factor = min(image.width // (_REDUCING_GAP * need_width), image.height // (_REDUCING_GAP * need_height))
    if factor < 2:
        return image
    if image.mode in _PREMULTIPLIED:
        return image.convert(_PREMULTIPLIED[image.mode]).reduce(factor).convert(image.mode)
    return image.reduce(factor)


def _needed(image: Image.Image, target: Preprocessing) -> tuple[int, int]:
    """(width, height) in the file's axes that `preprocess` resizes the displayed image to."""
    width, height = image.size
    swapped = image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS
    shown = (width, height) if swapped else (height, width)  # (height, width) as a viewer shows it
    need_height, need_width = resized_size(shown, target)
    return (need_height, need_width) if swapped else (need_width, need_height)  # back to file axes


def _pixels(image: Image.Image) -> torch.Tensor:
    """uint8 (C, H, W), a view of one copy out of an L, LA, RGB or RGBA image."""
    pixels = np.array(image, dtype=np.uint8)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if image.mode in ("LA", "RGBA"):
        pixels = on_white(pixels[..., :-1], pixels[..., -1:])
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _standard_mode(image: Image.Image) -> Image.Image:
    """The image as L, LA, RGB or RGBA; a PNG or GIF transparent colour becomes alpha."""
    alpha = image.mode in _ALPHA_MODES or image.info.get("transparency") is not None
    wanted = ("L" if image.mode in _GREY_MODES else "RGB") + ("A" if alpha else "")
    return image if image.mode == wanted else image.convert(wanted)  # CMYK, P, YCbCr, 1, ...


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


def load_image(
    path: Path, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS, root: Optional[Path] = None
) -> torch.Tensor:
    """A file as the network sees it: uint8 (prep.channels, *prep.size), from one open file that
    must lie under `root` when one is given (open_image)."""
    with open_image(path, root) as handle:
        return preprocess(_decode(handle, max_pixels, prep), prep)
