"""Fuzzing the readers of untrusted files: the image header readers, the decoder and the CSV reader
raise nothing but the project's own input errors (ImageFileError, CsvDatasetError), whatever the
bytes. Bounded and reproducible here; benchmarks/fuzz.py runs many more examples."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from photos import save_png16
from PIL import Image

from tasks.data.csv_images import CsvDatasetError, read_rows
from tasks.data.decoding import Preprocessing, decode_image_file
from tasks.data.images import ImageFileError, check_image_file, read_image_header

# FUZZ_EXAMPLES and FUZZ_RANDOM are set by benchmarks/fuzz.py; the suite runs the fixed default.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
MAX_PIXELS = 1 << 20  # small, so a mutated size is refused before Pillow allocates much


def encoded(kind: str, folder: Path) -> bytes:
    """A small valid file of each format the decoder reads, with varied pixels."""
    rgb = np.random.default_rng(0).integers(0, 256, (10, 14, 3), np.uint8)
    image, out = Image.fromarray(rgb), io.BytesIO()
    if kind == "gif":
        image.quantize(16).save(out, "GIF", save_all=True, append_images=[image.rotate(180).quantize(16)])
    elif kind == "webp":
        image.save(out, "WEBP", save_all=True, append_images=[image.rotate(180)], lossless=True)
    elif kind == "jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # turned a quarter: the header swaps the sides
        image.save(out, "JPEG", exif=exif.tobytes(), progressive=True)
    elif kind == "png":
        image.convert("RGBA").save(out, "PNG")
    else:  # 16-bit grey + alpha, decoded through libpng
        save_png16(folder / "deep.png", (rgb[..., :2].astype(np.uint16) * 257))
        return (folder / "deep.png").read_bytes()
    return out.getvalue()


with tempfile.TemporaryDirectory() as _folder:
    SEEDS = {kind: encoded(kind, Path(_folder)) for kind in ("png", "deep-png", "jpeg", "gif", "webp")}


@st.composite
def mutated(draw) -> bytes:
    """A valid file with a few bytes changed, cut, inserted or deleted, mostly in its headers."""
    blob = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.one_of(st.integers(0, min(64, len(blob) - 1)), st.integers(0, len(blob) - 1)))
        action = draw(st.sampled_from(["set", "insert", "delete", "cut", "grow"]))
        if action == "set":
            blob[where] = draw(st.integers(0, 255))
        elif action == "insert":
            blob[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del blob[where : where + draw(st.integers(1, 8))]
        elif action == "cut":
            del blob[max(1, where) :]
        else:  # a size field made large: the same bytes with their top bits set
            blob[where] = 0xFF
        if not blob:
            break
    return bytes(blob)


def input_errors_only(call, *args) -> None:
    """Runs `call`; the project's input errors are expected answers, anything else fails the test."""
    try:
        call(*args)
    except (ImageFileError, CsvDatasetError):
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_header_readers_on_arbitrary_bytes(data: bytes):
    input_errors_only(read_image_header, io.BytesIO(data))
    input_errors_only(check_image_file, io.BytesIO(data), MAX_PIXELS)


@FUZZ
@given(mutated())
def test_header_readers_on_mutated_images(data: bytes):
    handle = io.BytesIO(data)
    input_errors_only(check_image_file, handle, MAX_PIXELS)
    assert handle.tell() == 0  # left where the decoder starts


@FUZZ
@given(mutated(), st.sampled_from([None, Preprocessing(1, (4, 4)), Preprocessing(3, (8, 6), "pad")]))
def test_the_decoder_on_mutated_images(data: bytes, target):
    input_errors_only(decode_image_file, io.BytesIO(data), MAX_PIXELS, target)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """A root of a few real images, and a file outside it, that fuzzed CSVs may name."""
    root = tmp_path_factory.mktemp("fuzz") / "root"
    (root / "img").mkdir(parents=True)
    for kind, blob in SEEDS.items():
        (root / "img" / f"{kind}.{kind.split('-')[-1]}").write_bytes(blob)
    (root / "img" / "text.png").write_text("not an image\n")
    (root.parent / "outside.png").write_bytes(SEEDS["png"])
    (root / "img" / "link.png").symlink_to(root.parent / "outside.png")
    return root


NAMES = ["img/png.png", "img/jpeg.jpeg", "img/gif.gif", "img/webp.webp", "img/text.png", "img/link.png"]
NAMES += ["../outside.png", "/etc/passwd", "img", "missing.png", "image", "label", ""]
CELL = st.one_of(st.sampled_from(NAMES), st.sampled_from(["a", "1", "-2", " b "]), st.text(max_size=12))


@st.composite
def csv_texts(draw) -> bytes:
    """CSV bytes: rows of plausible and arbitrary cells with any separators and quoting, or noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    rows = draw(st.lists(st.lists(CELL, max_size=4), max_size=6))
    quote = draw(st.sampled_from(["", '"']))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(",".join(f"{quote}{cell}{quote}" for cell in row) for row in rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="replace")


@FUZZ
@given(csv_texts(), st.booleans())
def test_the_csv_reader_on_arbitrary_csvs(image_root: Path, data: bytes, labels_required: bool):
    csv_path = image_root.parent / "fuzz.csv"
    csv_path.write_bytes(data)
    input_errors_only(read_rows, csv_path, image_root, labels_required, MAX_PIXELS)
