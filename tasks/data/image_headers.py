"""The size an image file will decode to, read from its headers only. Each reader walks the file the
way Pillow's plugin does before it allocates the image, so the size judged is the size Pillow
allocates for the first frame, the only one decoded:

- PNG: IHDR; a second IHDR before the image data (Pillow would take the last) is refused. APNG
  frames must lie inside IHDR's size (Pillow refuses others).
- GIF: max(logical screen, first frame's x + width, y + height): Pillow grows the image to a first
  frame that extends past the screen. Later frames are never decoded.
- WebP: VP8X's canvas, else the bitstream's size; libwebp refuses frames outside the canvas.
- JPEG: the frame header (SOFn) found by the marker walk up to the scan; a second one is refused.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNKS = 10_000  # chunks before the image data: text, ICC, EXIF...; bounds a hostile walk
_GIF_MAX_STEPS = 200_000  # blocks and sub-blocks before the first frame (~50 MB of extensions)
# Pillow's JPEG markers: frame headers (DHP too, which Pillow reads as one), and those without a length.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE}
_JPEG_STANDALONE = frozenset([0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)])
_JPEG_MAX_STEPS = 100_000
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations whose display swaps width and height


class ImageFileError(ValueError):
    """A file is not an image the decoder reads, or its header declares too many pixels."""


class ImageHeader(NamedTuple):
    format: str
    width: int
    height: int
    colour: bool = True  # False for grey PNGs and JPEGs: --channels auto picks 1 when no image has colour


def read_header(handle: BinaryIO) -> ImageHeader:
    """Format, width and height of the open file (read from its start), as decoding allocates them."""
    handle.seek(0)
    start = handle.read(32)
    if start.startswith(_PNG_SIGNATURE) and start[12:16] == b"IHDR" and len(start) >= 26:
        return ImageHeader("PNG", *_png_size(handle), start[25] in (2, 3, 6))  # RGB, palette, RGBA
    if start[:6] in (b"GIF87a", b"GIF89a") and len(start) >= 13:
        return ImageHeader("GIF", *_gif_size(handle))
    if start[:4] == b"RIFF" and start[8:12] == b"WEBP" and len(start) >= 30:
        return ImageHeader("WebP", *_webp_size(start))
    if start[:3] == b"\xff\xd8\xff":
        return ImageHeader("JPEG", *_jpeg_frame(handle))
    raise ImageFileError("it is not a PNG, JPEG, GIF or WebP image (judged by its first bytes)")


def _png_size(handle: BinaryIO) -> tuple[int, int]:
    """IHDR's size, once the chunks up to the image data hold no other IHDR."""
    handle.seek(8)
    length, _, width, height = struct.unpack(">I4sII", handle.read(16))
    handle.seek(8 + 8 + length + 4)  # past IHDR as Pillow walks it: its declared length, then the CRC
    for _ in range(_PNG_MAX_CHUNKS):
        head = handle.read(8)
        if len(head) < 8 or head[4:] in (b"IDAT", b"fdAT", b"IEND"):
            return width, height  # a file cut short fails in the decoder, at this size or not at all
        if head[4:] == b"IHDR":
            raise ImageFileError("it is a PNG file with a second IHDR header before its image data")
        handle.seek(struct.unpack(">I", head[:4])[0] + 4, 1)  # the data, then the CRC
    raise ImageFileError(f"it is a PNG file with over {_PNG_MAX_CHUNKS:,} chunks before its image data")


def _gif_size(handle: BinaryIO) -> tuple[int, int]:
    """max(logical screen, first frame's extent): what Pillow allocates for the first frame."""
    handle.seek(6)
    width, height, flags = struct.unpack("<HHB", handle.read(5))
    handle.seek(13 + (3 << ((flags & 7) + 1)) if flags & 0x80 else 13)  # past a global colour table
    budget = _GIF_MAX_STEPS
    while budget > 0:
        budget -= 1
        tag = handle.read(1)
        if not tag or tag == b";":  # end of file or trailer
            break
        if tag == b",":  # image descriptor: left, top, width, height
            descriptor = handle.read(8)
            if len(descriptor) < 8:
                break
            left, top, frame_width, frame_height = struct.unpack("<HHHH", descriptor)
            return max(width, left + frame_width), max(height, top + frame_height)
        if tag == b"!":  # extension: a label, then sub-blocks of 1-255 bytes until an empty one
            handle.read(1)
            while budget > 0 and (length := handle.read(1)) not in (b"", b"\x00"):
                budget -= 1
                handle.seek(length[0], 1)
        # any other byte: Pillow skips it, one at a time, and so does this walk
    raise ImageFileError("it is a GIF file without a readable image descriptor")


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
    """Walks the markers after SOI as Pillow does, to the start of scan: the one frame header's size
    as a viewer shows it (an EXIF orientation that turns it a quarter swaps width and height), and
    whether it has colour components (3 for YCbCr, 4 for CMYK; 1 is grey)."""
    handle.seek(2)
    frames, orientation, exif_seen = [], 1, False
    byte = handle.read(1)
    for _ in range(_JPEG_MAX_STEPS):  # a bound, so a file of endless junk or tiny segments ends
        if byte != b"\xff":  # junk between segments, which Pillow skips
            if not byte:
                break
            byte = handle.read(1)
            continue
        marker = handle.read(1)
        if not marker or marker == b"\xff":  # end of file, or a fill byte before the marker
            byte = marker
            continue
        code = marker[0]
        if code == 0x00 or code in _JPEG_STANDALONE:
            byte = handle.read(1)
            continue
        length = handle.read(2)
        if code < 0xC0 or len(length) < 2 or struct.unpack(">H", length)[0] < 2:
            break  # Pillow refuses a marker it does not know
        body = handle.read(struct.unpack(">H", length)[0] - 2)
        if code == 0xDA:
            return _jpeg_size(frames, orientation)
        if code in _JPEG_FRAMES:
            frames.append(body)
        elif code == 0xE1 and body.startswith(b"Exif\x00\x00") and not exif_seen:  # Pillow's EXIF
            orientation, exif_seen = exif_orientation(body), True
        byte = handle.read(1)
    else:  # the bound: Pillow would walk on, maybe to another frame header
        raise ImageFileError(f"it is a JPEG file with over {_JPEG_MAX_STEPS:,} markers before its scan")
    if frames:  # the file ends, or holds a marker Pillow refuses, before its scan: no other frame
        return _jpeg_size(frames, orientation)
    raise ImageFileError("it is a JPEG file without a readable frame header")


def _jpeg_size(frames: list[bytes], orientation: int) -> tuple[int, int, bool]:
    if len(frames) != 1 or len(frames[0]) < 6:
        found = f"{len(frames)} frame headers" if len(frames) != 1 else "a frame header cut short"
        raise ImageFileError(f"it is a JPEG file with {found} before its scan; one is decoded")
    _, height, width, components = struct.unpack(">BHHB", frames[0][:6])
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return width, height, components > 1


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
