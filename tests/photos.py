"""Test photos: a writer for every kind of file the decoder must read, and image folders of mixed
kinds and sizes whose class a small CNN can learn after any resize mode."""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

Writer = Callable[[Path, np.ndarray], None]  # (path, RGB uint8 (H, W, 3))


def grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB uint8 (H, W, 3), as uint8 (H, W)."""
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)


def _palette(rgb: np.ndarray, colours: int = 64) -> Image.Image:
    """A "P" image of at most `colours` colours (fast octree: median cut takes ~50x longer)."""
    return Image.fromarray(rgb).quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)


def save_png16(path: Path, values: np.ndarray, transparent: Optional[tuple[int, ...]] = None) -> None:
    """A 16-bit PNG of uint16 (H, W) grey or (H, W, C) grey+alpha, RGB or RGBA (C = 2, 3, 4), with a
    tRNS colour if given, written by hand: Pillow writes no 16-bit colour."""
    height, width = values.shape[:2]
    colour_type = {2: 0, 3: {2: 4, 3: 2, 4: 6}.get(values.shape[-1])}[values.ndim]
    rows = values.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    blob = chunk(b"IHDR", header)
    if transparent is not None:
        blob += chunk(b"tRNS", struct.pack(f">{len(transparent)}H", *transparent))
    blob += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + blob)


def write_grey_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(grey(rgb)).save(path)


def write_bilevel_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(grey(rgb)).convert("1", dither=Image.Dither.NONE).save(path)


def write_grey_alpha_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(np.dstack([grey(rgb), corner_alpha(rgb.shape[:2])])).save(path)


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


def write_rgba_png(path: Path, rgb: np.ndarray, alpha: Optional[np.ndarray] = None) -> None:
    alpha = corner_alpha(rgb.shape[:2]) if alpha is None else alpha
    Image.fromarray(np.dstack([rgb, alpha])).save(path)


def corner_alpha(shape: tuple[int, int]) -> np.ndarray:
    """Opaque but for a fully transparent top-left block and a half-transparent one below it."""
    height, width = shape
    alpha = np.full(shape, 255, np.uint8)
    alpha[: height // 8, : width // 8] = 0
    alpha[height // 8 : height // 4, : width // 8] = 128
    return alpha


def write_palette_png(path: Path, rgb: np.ndarray) -> None:
    _palette(rgb).save(path)


def write_palette_alpha_png(path: Path, rgb: np.ndarray) -> None:
    """A palette PNG whose top-left block is a transparent palette entry."""
    _palette_with_hole(rgb).save(path, transparency=_HOLE)


def write_palette_gif(path: Path, rgb: np.ndarray) -> None:
    _palette(rgb).save(path)


def write_palette_alpha_gif(path: Path, rgb: np.ndarray) -> None:
    """A GIF whose top-left block is its transparent colour."""
    _palette_with_hole(rgb).save(path, transparency=_HOLE)


_HOLE = 63  # the palette entry that _palette_with_hole makes transparent


def _palette_with_hole(rgb: np.ndarray) -> Image.Image:
    """A "P" image of 63 colours plus entry 63 (black) filling the top-left eighth of each side."""
    image = _palette(rgb, _HOLE)
    colours = image.getpalette()[: 3 * _HOLE]
    image.putpalette(colours + [0, 0, 0] * (_HOLE + 1 - len(colours) // 3))
    height, width = rgb.shape[:2]
    image.paste(_HOLE, (0, 0, max(1, width // 8), max(1, height // 8)))
    return image


def write_animated_gif(path: Path, rgb: np.ndarray) -> None:
    """Two frames: `rgb`, then its negative, which a decoder must ignore."""
    frames = [_palette(rgb), _palette(255 - rgb)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_grey16_png(path: Path, rgb: np.ndarray) -> None:
    save_png16(path, grey(rgb).astype(np.uint16) * 257)


def write_rgb16_png(path: Path, rgb: np.ndarray) -> None:
    save_png16(path, rgb.astype(np.uint16) * 257)


def write_rgb_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, quality=92)


def write_grey_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(grey(rgb)).save(path, quality=92)


def write_cmyk_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).convert("CMYK").save(path, quality=92)


def write_exif_jpeg(path: Path, rgb: np.ndarray, orientation: int = 6) -> None:
    """Stored a quarter turn away, with the EXIF orientation (6 or 8) that turns it back to `rgb`."""
    stored = np.rot90(rgb, 1 if orientation == 6 else -1)  # 6: a viewer turns it clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=92, exif=exif)


def write_lossy_webp(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, quality=90, method=0)


def write_lossless_webp(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, lossless=True, method=0)


def write_animated_webp(path: Path, rgb: np.ndarray) -> None:
    """Two lossless frames: `rgb`, then its negative, which a decoder must ignore."""
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True, method=0, duration=100)


class Kind(NamedTuple):
    suffix: str
    write: Writer
    channels: int  # what decoding gives
    exact: bool  # decodes to the written pixels (lossless, not quantized)


KINDS: dict[str, Kind] = {
    "grey_png": Kind(".png", write_grey_png, 1, True),
    "bilevel_png": Kind(".png", write_bilevel_png, 1, False),
    "grey_alpha_png": Kind(".png", write_grey_alpha_png, 1, False),
    "rgb_png": Kind(".png", write_rgb_png, 3, True),
    "rgba_png": Kind(".png", write_rgba_png, 3, False),
    "palette_png": Kind(".png", write_palette_png, 3, False),
    "palette_alpha_png": Kind(".png", write_palette_alpha_png, 3, False),
    "palette_gif": Kind(".gif", write_palette_gif, 3, False),
    "palette_alpha_gif": Kind(".gif", write_palette_alpha_gif, 3, False),
    "animated_gif": Kind(".gif", write_animated_gif, 3, False),
    "grey16_png": Kind(".png", write_grey16_png, 1, True),
    "rgb16_png": Kind(".png", write_rgb16_png, 3, True),
    "rgb_jpeg": Kind(".jpg", write_rgb_jpeg, 3, False),
    "grey_jpeg": Kind(".jpg", write_grey_jpeg, 1, False),
    "cmyk_jpeg": Kind(".jpg", write_cmyk_jpeg, 3, False),
    "exif_jpeg": Kind(".jpg", write_exif_jpeg, 3, False),
    "lossy_webp": Kind(".webp", write_lossy_webp, 3, False),
    "lossless_webp": Kind(".webp", write_lossless_webp, 3, True),
    "animated_webp": Kind(".webp", write_animated_webp, 3, True),
}


def write_kind(kind: str, stem: Path, rgb: np.ndarray) -> Path:
    """Writes `rgb` as `kind` to `stem` plus the kind's suffix."""
    path = stem.parent / (stem.name + KINDS[kind].suffix)
    KINDS[kind].write(path, rgb)
    return path


def class_image(label: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 (H, W, 3) of class `label`: a brightness pattern about the centre, in units of the
    shorter side (horizontal bands, vertical bands, a disc, a checkerboard; inverted for labels 4-7),
    so a centre crop sees all of it and bars or stretching keep its kind, grey or not; a class hue
    and noise on top."""
    height, width = size
    side = min(height, width)
    v = ((np.arange(height, dtype=np.float32) + 0.5 - height / 2) / side)[:, None]
    u = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / side)[None, :]
    sign = -1 if (label // 4) % 2 else 1
    brightness = 0.5 + sign * 0.38 * rng.uniform(0.8, 1.1) * _wave(label % 4, u, v)
    hue = (label / num_classes + rng.uniform(-0.04, 0.04)) % 1.0
    colour = 255 * np.array(colorsys.hsv_to_rgb(hue, 0.6, 1.0), np.float32)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 10
    pixels = brightness[..., None].astype(np.float32) * colour + noise
    return pixels.clip(0, 255).astype(np.uint8)


def _wave(family: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A pattern in [-1, 1] over centred coordinates u (1, W) and v (H, 1), (-0.5, 0.5) on the
    shorter side."""
    if family == 0:
        return np.cos(3 * np.pi * v) + 0 * u  # horizontal bands
    if family == 1:
        return np.cos(3 * np.pi * u) + 0 * v  # vertical bands
    if family == 2:
        return np.cos(2 * np.pi * np.minimum(np.sqrt(u**2 + v**2), 0.5))  # a disc, dark beyond it
    return np.cos(3 * np.pi * u) * np.cos(3 * np.pi * v)  # a checkerboard


def write_class_folders(
    root: Path, classes: Sequence[str], per_class: int, sizes: Sequence[tuple[int, int]], seed: int = 0
) -> dict[str, list[Path]]:
    """An ImageFolder tree root/CLASS/NNNN-KIND.ext whose files cycle through every kind in KINDS and
    every (height, width) in `sizes`, kind and size uncorrelated with the class; the same for a seed."""
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)
    written: dict[str, list[Path]] = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        size_order = rng.permutation(per_class) % len(sizes)
        written[name] = []
        for index in range(per_class):
            kind = kinds[(index + label) % len(kinds)]
            rgb = class_image(label, len(classes), sizes[size_order[index]], rng)
            written[name].append(write_kind(kind, root / name / f"{index:04d}-{kind}", rgb))
    return written


def write_photos(folder: Path, count: int, size: tuple[int, int] = (128, 128), seed: int = 0) -> list[Path]:
    """`count` plain RGB JPEGs of one (height, width)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{index:05d}.jpg" for index in range(count)]
    for index, path in enumerate(paths):
        write_rgb_jpeg(path, class_image(index % 3, 3, size, rng))
    return paths


def gif_bomb(screen: tuple[int, int] = (28, 28), frame: tuple[int, int] = (40000, 40000)) -> bytes:
    """A GIF whose first frame is larger than its logical screen; its LZW data is only a clear code
    and an end code, since the header check must refuse it before any decoding."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    return head + b"," + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x44\x01\x00;"


def many_frame_gif(size: tuple[int, int], frames: int) -> bytes:
    """A GIF of `frames` frames: the first white, the others black (one decoded image each)."""
    blobs = []
    for colour in (255, 0):
        out = io.BytesIO()
        Image.new("L", size, colour).convert("P").save(out, "GIF")
        blobs.append(out.getvalue())
    start = 13 + (3 << ((blobs[0][10] & 7) + 1))  # past the header and global colour table
    return blobs[0][:start] + blobs[0][start:-1] + blobs[1][start:-1] * (frames - 1) + b";"


def save_striped_png(path: Path, side: int) -> None:
    """An RGB PNG of side x side pixels whose rows are all alike, so it compresses to little."""
    row = np.zeros((side, 3), np.uint8)
    row[::7] = (200, 100, 50)
    raw = b"\x00" + row.tobytes()
    packer = zlib.compressobj(1)
    data = b"".join(packer.compress(raw * 500) for _ in range(side // 500)) + packer.compress(
        raw * (side % 500)
    )
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", header) + chunk(b"IDAT", data + packer.flush()) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
