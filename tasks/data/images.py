"""The in-memory form every dataset source produces, and the header check every image file passes
before it is decoded."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch


class ImageData(NamedTuple):
    """uint8 images (N, C, H, W) with int64 labels, for both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]


def check_image_data(data: ImageData) -> ImageData:
    """Raises ValueError when shapes, dtypes or labels are inconsistent."""
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{split} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{split} split has {len(images)} images and {len(labels)} labels")
        if labels.min() < 0 or labels.max() >= len(data.class_names):
            raise ValueError(f"{split} labels must lie in [0, {len(data.class_names)})")
    train_shape, test_shape = tuple(data.train_images.shape[1:]), tuple(data.test_images.shape[1:])
    if train_shape != test_shape:
        raise ValueError(f"train images are {train_shape}, test images {test_shape}")
    return data


DEFAULT_MAX_PIXELS = 50_000_000  # flows.config's max_image_pixels default: ~7000 x 7000
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn; C4, C8, CC are other markers
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])  # markers without a length
_JPEG_MAX_SEGMENTS = 1000
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations whose display swaps width and height


class ImageFileError(ValueError):
    """A file is not an image the decoder reads, or its header declares too many pixels."""


class ImageHeader(NamedTuple):
    format: str
    width: int
    height: int
    colour: bool = True  # False for grey PNGs and JPEGs: --channels auto picks 1 when no image has colour


def check_image_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Reads the header of an image file, without decoding it: refuses files that are not PNG,
    JPEG, GIF or WebP, and images declaring more than `max_pixels` pixels (decompression bombs)."""
    try:
        header = read_image_header(path)
    except OSError as error:
        raise ImageFileError(f"cannot read it: {error.strerror or error}") from None
    pixels = header.width * header.height
    if pixels == 0:
        raise ImageFileError(f"its {header.format} header declares {header.width}x{header.height} pixels")
    if pixels > max_pixels:
        raise ImageFileError(
            f"its {header.format} header declares {header.width}x{header.height} = {pixels:,} pixels, "
            f"over the limit of {max_pixels:,} (--max-image-pixels); it was not decoded"
        )
    return header


def read_image_header(path: Path) -> ImageHeader:
    """Format, width and height from a file's first bytes (PNG, GIF, WebP) or its markers up to the
    frame header (JPEG)."""
    with open(path, "rb") as handle:
        start = handle.read(32)
        if start.startswith(b"\x89PNG\r\n\x1a\n") and start[12:16] == b"IHDR" and len(start) >= 26:
            colour = start[25] in (2, 3, 6)  # RGB, palette, RGBA; 0 and 4 are grey
            return ImageHeader("PNG", *struct.unpack(">II", start[16:24]), colour)
        if start[:6] in (b"GIF87a", b"GIF89a") and len(start) >= 10:
            return ImageHeader("GIF", *struct.unpack("<HH", start[6:10]))
        if start[:4] == b"RIFF" and start[8:12] == b"WEBP" and len(start) >= 30:
            return ImageHeader("WebP", *_webp_size(start))
        if start[:3] == b"\xff\xd8\xff":
            handle.seek(2)
            return ImageHeader("JPEG", *_jpeg_frame(handle))
    raise ImageFileError("it is not a PNG, JPEG, GIF or WebP image (judged by its first bytes)")


def _webp_size(start: bytes) -> tuple[int, int]:
    chunk = start[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas size, minus one
        return int.from_bytes(start[24:27], "little") + 1, int.from_bytes(start[27:30], "little") + 1
    if chunk == b"VP8L" and start[20] == 0x2F:  # lossless: two 14-bit sizes, minus one
        bits = int.from_bytes(start[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and start[23:26] == b"\x9d\x01\x2a":  # lossy: 14-bit sizes after the start code
        width, height = struct.unpack("<HH", start[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise ImageFileError("it is a WebP file without a VP8, VP8L or VP8X header")


def _jpeg_frame(handle: BinaryIO) -> tuple[int, int, bool]:
    """Walks the segments after SOI to the first frame header (SOFn) and reads its size, as a viewer
    shows it (an EXIF orientation that turns it a quarter swaps width and height), and whether it has
    colour components (3 for YCbCr, 4 for CMYK; 1 is grey)."""
    orientation = 1
    for _ in range(_JPEG_MAX_SEGMENTS):  # a bound, so a file of endless tiny segments ends
        if handle.read(1) != b"\xff":
            break
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes
            marker = handle.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of file, end of image or scan data first
            break
        if marker[0] in _JPEG_STANDALONE:
            continue
        length = handle.read(2)
        if len(length) < 2 or struct.unpack(">H", length)[0] < 2:
            break
        if marker[0] in _JPEG_FRAMES:
            frame = handle.read(6)
            if len(frame) < 6:
                break
            _, height, width, components = struct.unpack(">BHHB", frame)
            if orientation in _QUARTER_TURNS:
                width, height = height, width
            return width, height, components > 1
        body = struct.unpack(">H", length)[0] - 2
        if marker[0] == 0xE1 and orientation == 1:  # APP1, where EXIF lives
            segment = handle.read(body)
            orientation = exif_orientation(segment)
            continue
        handle.seek(body, 1)
    raise ImageFileError("it is a JPEG file without a readable frame header")


def exif_orientation(segment: bytes) -> int:
    """The orientation tag (1-8) of an APP1 segment's EXIF data, 1 when it has none."""
    if not segment.startswith(b"Exif\x00\x00") or len(segment) < 16:
        return 1
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    (first,) = struct.unpack(order + "I", tiff[4:8])
    if first + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[first : first + 2])
    for entry in range(min(count, 1000)):
        start = first + 2 + 12 * entry
        if start + 12 > len(tiff):
            break
        tag, _, _, value = struct.unpack(order + "HHIH", tiff[start : start + 10])
        if tag == 0x0112:
            return value if 1 <= value <= 8 else 1
    return 1
