"""tasks.data.images and image_headers: the size judged from the headers is the size decoded, for
every way a file can grow past its first header; and one open file, confined to its root."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data import images
from tasks.data.decoding import decode_image_file
from tasks.data.images import ImageFileError, check_image_file, open_image, read_image_header


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gif(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF of a 2-colour global table, then frames (left, top, width, height) whose LZW data is
    only a clear code and end: what the header check must judge."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    body = b"".join(b"," + struct.pack("<HHHHB", *frame, 0) + b"\x02\x02\x44\x01\x00" for frame in frames)
    return head + body + b";"


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(out, "PNG")
    return out.getvalue()


def jpeg_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(out, "JPEG")
    return out.getvalue()


def written(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


# Sizes that grow past the first header


def test_a_gif_bomb_is_judged_by_its_first_frame_and_never_decoded(tmp_path, monkeypatch):
    bomb = written(tmp_path, "bomb.gif", gif((28, 28), [(0, 0, 40000, 40000)]))
    corner = written(tmp_path, "corner.gif", gif((28, 28), [(39972, 39990, 28, 10)]))
    opened = []
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args))
    for path in (bomb, corner):
        assert read_image_header(path)[1:3] == (40000, 40000)  # max(screen, left + width, top + height)
        with pytest.raises(ImageFileError, match="its GIF header declares 40000x40000 = 1,600,000,000"):
            decode_image_file(path)
    assert opened == []  # refused before Pillow saw it


def test_gif_extensions_and_stray_bytes_before_the_first_frame_are_walked(tmp_path):
    out = io.BytesIO()
    Image.new("L", (28, 60), 200).convert("P").save(out, "GIF")
    blob = bytearray(out.getvalue())
    blob[8:10] = struct.pack("<H", 28)  # the logical screen: 28x28, the frame 28x60
    table = 13 + (3 << ((blob[10] & 7) + 1))
    comment = b"!\xfe" + b"\xff" + bytes(255) + b"\x10" + bytes(16) + b"\x00"
    control = b"!\xf9\x04\x00\x00\x00\x00\x00"
    path = written(tmp_path, "a.gif", blob[:table] + comment + b"\x07" + control + blob[table:])
    assert read_image_header(path)[1:3] == (28, 60)
    assert tuple(decode_image_file(path).shape) == (3, 60, 28)  # Pillow grew the image just as judged
    for broken in (gif((28, 28), []), gif((28, 28), [])[:-1] + b"!\xfe\x05ab"):
        with pytest.raises(ImageFileError, match="a GIF file without a readable image descriptor"):
            check_image_file(written(tmp_path, "b.gif", broken))


def test_many_frames_decode_only_the_first(tmp_path):
    frames = []
    for colour in (255, 0):
        out = io.BytesIO()
        Image.new("L", (28, 28), colour).convert("P").save(out, "GIF")
        frames.append(out.getvalue())
    table = 3 << ((frames[0][10] & 7) + 1)
    head, first, other = frames[0][: 13 + table], frames[0][13 + table : -1], frames[1][13 + table : -1]
    path = written(tmp_path, "many.gif", head + first + other * 5000 + b";")
    assert Image.open(path).n_frames == 5001 and read_image_header(path)[1:3] == (28, 28)
    assert decode_image_file(path).eq(255).all()  # the first frame, white


def test_a_second_png_header_is_refused(tmp_path):
    blob = png_bytes(8, 8)
    second = chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    path = written(tmp_path, "two.png", blob[:33] + chunk(b"tEXt", b"a\x00b") + second + blob[33:])
    with pytest.raises(ImageFileError, match="a PNG file with a second IHDR header before its image data"):
        check_image_file(path)
    texts = b"".join(chunk(b"tEXt", b"k\x00" + bytes(100)) for _ in range(50))
    assert read_image_header(written(tmp_path, "texts.png", blob[:33] + texts + blob[33:]))[1:3] == (8, 8)


def test_an_apng_frame_larger_than_its_header_is_not_decoded(tmp_path):
    out = io.BytesIO()
    first, second = Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8), (9, 9, 9))
    first.save(out, "PNG", save_all=True, append_images=[second])
    blob = out.getvalue()
    start = blob.index(b"fcTL") - 4
    control = bytearray(blob[start + 8 : start + 8 + 26])
    control[4:12] = struct.pack(">II", 40000, 40000)  # the first frame's width and height
    path = written(tmp_path, "a.png", blob[:start] + chunk(b"fcTL", bytes(control)) + blob[start + 38 :])
    assert read_image_header(path)[1:3] == (8, 8)
    with pytest.raises(ImageFileError, match="cannot be decoded"):
        decode_image_file(path)


def test_a_jpeg_with_two_frame_headers_is_refused(tmp_path):
    blob = jpeg_bytes(16, 8)
    start = blob.index(b"\xff\xc0")
    length = struct.unpack(">H", blob[start + 2 : start + 4])[0]
    frame = bytearray(blob[start : start + 2 + length])
    frame[5:9] = struct.pack(">HH", 8000, 8000)
    for marker in (b"\xff\xc0", b"\xff\xde"):  # another SOF0, and DHP, which Pillow reads as one
        again = blob[: start + 2 + length] + marker + bytes(frame[2:]) + blob[start + 2 + length :]
        with pytest.raises(ImageFileError, match="a JPEG file with 2 frame headers before its scan"):
            check_image_file(written(tmp_path, "two.jpg", again))
    junk = blob[:start] + b"\x00\x13" + blob[start:]  # stray bytes Pillow skips, and so does the walk
    assert read_image_header(written(tmp_path, "junk.jpg", junk))[1:3] == (16, 8)


def test_an_animated_webp_frame_outside_its_canvas_is_not_decoded(tmp_path):
    out = io.BytesIO()
    frames = [Image.new("RGB", (600, 600), colour) for colour in ((10, 20, 30), (200, 0, 0))]
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    blob = bytearray(out.getvalue())
    blob[24:30] = (27).to_bytes(3, "little") * 2  # VP8X canvas 28x28, frames still 600x600
    path = written(tmp_path, "anim.webp", bytes(blob))
    assert read_image_header(path)[1:3] == (28, 28)
    with pytest.raises(ImageFileError, match="cannot be decoded"):  # libwebp refuses such frames
        decode_image_file(path)


# One open file, confined to a root


def test_open_image_confines_to_its_root_and_reads_from_the_start(tmp_path):
    root, outside = tmp_path / "root", written(tmp_path, "outside.png", png_bytes(4, 4))
    root.mkdir()
    inside = written(root, "a.png", png_bytes(6, 4))
    (root / "link.png").symlink_to(outside)
    with open_image(root / "sub" / ".." / "a.png", root) as handle:
        assert handle.name == str(inside) and check_image_file(handle)[1:3] == (6, 4) and handle.tell() == 0
    with pytest.raises(ImageFileError, match=f"link.png resolves to {outside}, outside {root}"):
        open_image(root / "link.png", root)
    assert check_image_file(root / "link.png")[1:3] == (4, 4)  # no root: any file the caller names


def test_fifos_and_devices_are_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    done = threading.Event()

    def check():
        for path in (tmp_path / "pipe.png", Path("/dev/zero")):
            with pytest.raises(ImageFileError, match="is not a regular file"):
                check_image_file(path)
        done.set()

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    assert done.wait(10), "opening a FIFO blocked"
    worker.join()


@pytest.mark.parametrize("swap", ["folder", "file"])
def test_a_path_swapped_for_a_symlink_after_it_was_resolved_is_refused(tmp_path, monkeypatch, swap):
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "img").mkdir(parents=True)
    secret.mkdir()
    written(root / "img", "a.png", png_bytes(4, 4))
    written(secret, "a.png", png_bytes(5, 5))
    real_open = open

    def swapping_open(path, *args, **kwargs):  # between open_image's resolve and its open
        if swap == "folder":
            (root / "img").rename(root / "old")
            (root / "img").symlink_to(secret)
        else:
            (root / "img" / "a.png").unlink()
            (root / "img" / "a.png").symlink_to(secret / "a.png")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", swapping_open, raising=False)
    problem = "was opened at .*secret/a.png, outside .*root: moved" if swap == "folder" else "symbolic links"
    with pytest.raises(ImageFileError, match=problem):
        open_image(root / "img" / "a.png", root)
