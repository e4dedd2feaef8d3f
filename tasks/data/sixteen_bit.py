"""16-bit PNGs with all their bits: Pillow opens 16-bit grey as such but unpacks 16-bit colour to
its top bytes, so colour takes two decodes (top, then low bytes) of the one open file. Values
become round(v / 257), as every 16-bit image reaches the network as 8 bits."""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from common import compat
from tasks.data.images import ImageFileError

_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}  # Pillow's raw modes of 16-bit PNG colour
_BAND = 1 << 20  # values scaled from 16 bits per step, so the int32 copy stays small


def png_bit_depth(handle: BinaryIO) -> int:
    """The bit depth a PNG's IHDR declares; the file is left at position 0."""
    handle.seek(24)  # IHDR's bit depth, after the signature, chunk head, width and height
    depth = handle.read(1)
    handle.seek(0)
    return depth[0] if depth else 0


def sixteen_bit_png(handle: BinaryIO) -> torch.Tensor:
    """A 16-bit PNG of any colour type with all 16 bits (Pillow keeps only the top byte of colour
    ones), as round(v / 257). A tRNS colour, matched on the 16-bit values, and alpha become white."""
    high, key = _sixteen_bit_bytes(handle, low=False)
    if high.dtype == np.uint8:  # colour: the low bytes come from a second decode of the same file
        high = (high.astype(np.uint16) << 8) | _sixteen_bit_bytes(handle, low=True)[0]
    if high.ndim == 2:
        high = high[..., None]
    elif high.shape[-1] == 4 and key == "LA":  # grey + alpha, decoded as the bytes (L, l, A, a)
        high = (high[..., 0::2] << 8) | high[..., 1::2]
    pixels = sixteen_to_eight(high)
    if high.shape[-1] in (2, 4):
        return torch.from_numpy(on_white(pixels[..., :-1], pixels[..., -1:])).permute(2, 0, 1)
    if key is not None:
        keyed = (high == np.asarray(key, np.uint16)).all(-1)
        pixels[keyed] = 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _sixteen_bit_bytes(handle: BinaryIO, low: bool) -> tuple[np.ndarray, Any]:
    """(H, W[, C]) of a 16-bit PNG, EXIF orientation applied: uint16 for grey, else its high (or
    `low`) bytes, or all four bytes of grey + alpha; and its tRNS colour, or "LA"."""
    handle.seek(0)
    with Image.open(handle, formats=["PNG"]) as image:
        # Pillow unpacks 16-bit colour to 8 bits by a raw mode of the same bits per pixel: its
        # little-endian twin takes the low bytes, RGBA all four of grey + alpha (common/compat.py).
        raw_mode, key = compat.png_raw_mode(image), image.info.get("transparency")
        if raw_mode == "LA;16B":
            compat.set_png_raw_mode(image, "RGBA")
            key = "LA"
        elif low and raw_mode in _LOW_BYTES:
            compat.set_png_raw_mode(image, _LOW_BYTES[raw_mode])
        elif low:
            raise ImageFileError(f"it is a 16-bit PNG of Pillow raw mode {raw_mode}, which is not decoded")
        ImageOps.exif_transpose(image, in_place=True)
        values = np.array(image)
    return (values.astype(np.uint16) if key == "LA" else values), key


def sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Scales 16-bit values to 8 bits: round(v * 255 / 65535), which is round(v / 257), a band of
    values at a time."""
    flat, out = values.reshape(-1), np.empty(values.size, np.uint8)
    for start in range(0, flat.size, _BAND):
        band = flat[start : start + _BAND].astype(np.uint32)
        out[start : start + _BAND] = (band + 128) // 257
    return out.reshape(values.shape)


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composites uint8 colour on white by uint8 alpha, in integers so every platform rounds alike
    (16 bits suffice: colour * alpha + 255 * (255 - alpha) + 127 <= 65152)."""
    colour, alpha = colour.astype(np.uint16), alpha.astype(np.uint16)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
