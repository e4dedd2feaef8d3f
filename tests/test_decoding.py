"""tasks.data.decoding: every kind of file to the same pixels, and crop, pad and stretch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from tasks.data.decoding import (
    RESIZE_MODES,
    Preprocessing,
    decode_image_file,
    load_image,
    preprocess,
    resized_size,
)
from tasks.data.images import ImageFileError, check_image_file
from tests.photos import (
    KINDS,
    class_image,
    grey,
    save_png16,
    write_class_folders,
    write_exif_jpeg,
    write_grey_alpha_png,
    write_kind,
    write_rgb_jpeg,
    write_rgba_png,
)

# Mean absolute error allowed against the written picture, for kinds that do not keep it exactly.
LOSSY = {"jpeg": 12.0, "webp": 12.0, "gif": 8.0, "palette": 8.0, "bilevel": 130.0, "alpha": 0.5, "png": 0.0}


def chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) numpy to (C, H, W) torch."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def thirds(height: int, width: int) -> np.ndarray:
    """RGB: red, green and blue thirds from left to right."""
    rgb = np.zeros((height, width, 3), np.uint8)
    for channel in range(3):
        rgb[:, channel * width // 3 : (channel + 1) * width // 3, channel] = 255
    return rgb


def test_preprocessing_round_trips_through_json():
    prep = Preprocessing(3, (224, 160), "pad")
    back = Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict())))
    assert back == prep and hash(back) == hash(prep) and back.size == (224, 160)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"channels": 2, "size": (8, 8)}, "channels must be 1 or 3, got 2"),
        ({"channels": 1, "size": (0, 8)}, r"size must be two positive integers .* got \(0, 8\)"),
        ({"channels": 1, "size": (8,)}, "size must be two positive integers"),
        ({"channels": 1, "size": (8, 8), "resize_mode": "zoom"}, "one of crop, pad, stretch, got 'zoom'"),
    ],
)
def test_preprocessing_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**fields)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_decodes_to_its_channels_and_pixels(tmp_path: Path, kind: str):
    rgb = class_image(1, 3, (40, 56), np.random.default_rng(0))
    path = write_kind(kind, tmp_path / "image", rgb)
    pixels = decode_image_file(path)
    expected = chw(rgb if KINDS[kind].channels == 3 else grey(rgb))
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (KINDS[kind].channels, 40, 56)
    assert (3 if check_image_file(path).colour else 1) == KINDS[kind].channels  # header agrees
    below_corner = (pixels[:, 10:].float() - expected[:, 10:].float()).abs().mean()  # corner: alpha
    if KINDS[kind].exact:
        assert torch.equal(pixels, expected)
    tolerance = next(value for key, value in LOSSY.items() if key in kind)
    assert below_corner <= tolerance, f"{kind}: mean error {below_corner:.2f}"


SIXTEEN = np.array([[0, 255, 256, 383, 384, 32768], [32895, 65151, 65152, 65280, 65407, 65535]], np.uint16)


def eight(values: np.ndarray) -> np.ndarray:
    """round(v / 257) in exact integers, half up (never a tie: 257 is odd)."""
    return ((values.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])  # grey, grey + alpha, RGB, RGBA
def test_every_sixteen_bit_png_is_scaled_to_round_v_over_257(tmp_path: Path, channels: int):
    rng = np.random.default_rng(channels)
    colour = np.stack([SIXTEEN, rng.integers(0, 65536, SIXTEEN.shape), SIXTEEN[::-1, ::-1]], -1)
    colour = colour[..., :1] if channels < 3 else colour
    alpha = np.full(SIXTEEN.shape + (1,), 65535, np.uint16)
    alpha[0, :2, 0] = (0, 32896)  # transparent, and 128 of 255 after scaling
    values = (np.concatenate([colour, alpha], -1) if channels in (2, 4) else colour).astype(np.uint16)
    save_png16(tmp_path / "deep.png", values[..., 0] if channels == 1 else values)
    expected = eight(colour).astype(np.int64)
    if channels in (2, 4):
        expected[0, 0], expected[0, 1] = 255, (expected[0, 1] * 128 + 255 * 127 + 127) // 255
    pixels = decode_image_file(tmp_path / "deep.png")
    assert torch.equal(pixels, chw(expected.astype(np.uint8)))
    assert check_image_file(tmp_path / "deep.png").colour == (channels > 2)  # header agrees


def test_sixteen_bit_transparent_colours_match_all_sixteen_bits(tmp_path: Path):
    save_png16(tmp_path / "grey.png", SIXTEEN, transparent=(383,))
    expected = eight(SIXTEEN)
    expected[0, 3] = 255  # 383 only: 384 rounds to the same 8 bits but is another colour
    assert torch.equal(decode_image_file(tmp_path / "grey.png"), chw(expected))
    rgb = np.stack([SIXTEEN, SIXTEEN, SIXTEEN[::-1, ::-1]], -1)
    save_png16(tmp_path / "rgb.png", rgb, transparent=(256, 256, 65280))
    expected = eight(rgb)
    expected[0, 2] = 255
    assert torch.equal(decode_image_file(tmp_path / "rgb.png"), chw(expected))


def test_alpha_is_composited_on_white(tmp_path: Path):
    rgb = np.array([[[255, 0, 0], [255, 0, 0], [0, 0, 0]]], np.uint8)
    write_rgba_png(tmp_path / "rgba.png", rgb, alpha=np.array([[0, 255, 128]], np.uint8))
    on_white = (0 * 128 + 255 * 127 + 127) // 255
    expected = torch.tensor([[[255, 255, on_white]], [[255, 0, on_white]], [[255, 0, on_white]]])
    assert torch.equal(decode_image_file(tmp_path / "rgba.png"), expected.to(torch.uint8))
    write_grey_alpha_png(tmp_path / "la.png", np.zeros((16, 16, 3), np.uint8))  # transparent corner
    grey_alpha = decode_image_file(tmp_path / "la.png")
    assert grey_alpha.shape == (1, 16, 16) and grey_alpha[0, 0, 0] == 255 and grey_alpha[0, 15, 15] == 0


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_gives_its_exact_colours_and_white_where_transparent(tmp_path: Path, suffix: str):
    colours = np.array([[10, 20, 30], [200, 100, 0], [0, 0, 0], [90, 250, 160]], np.uint8)
    indices = np.arange(24, dtype=np.uint8).reshape(4, 6) % 4
    image = Image.frombytes("P", (6, 4), indices.tobytes())
    image.putpalette(colours.flatten().tolist())
    image.save(tmp_path / f"plain{suffix}")
    image.save(tmp_path / f"holes{suffix}", transparency=2)
    assert torch.equal(decode_image_file(tmp_path / f"plain{suffix}"), chw(colours[indices]))
    expected = colours[indices].copy()
    expected[indices == 2] = 255
    assert torch.equal(decode_image_file(tmp_path / f"holes{suffix}"), chw(expected))


@pytest.mark.parametrize("kind", ["animated_gif", "animated_webp"])
def test_only_the_first_frame_is_decoded(tmp_path: Path, kind: str):
    rgb = class_image(0, 3, (32, 32), np.random.default_rng(1))
    pixels = decode_image_file(write_kind(kind, tmp_path / "anim", rgb)).float()
    assert Image.open(tmp_path / f"anim{KINDS[kind].suffix}").n_frames == 2
    assert (pixels - chw(rgb)).abs().mean() < 8 < (pixels - chw(255 - rgb)).abs().mean()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int):
    rgb = np.full((40, 64, 3), 255, np.uint8)
    rgb[:16, :16] = (255, 0, 0)  # red top-left, as a viewer shows it
    write_exif_jpeg(tmp_path / "turned.jpg", rgb, orientation)
    assert Image.open(tmp_path / "turned.jpg").size == (40, 64)  # stored (width, height) swapped
    pixels = decode_image_file(tmp_path / "turned.jpg").int()
    assert pixels.shape == (3, 40, 64)
    assert pixels[:, 4, 4].tolist() == pytest.approx([255, 0, 0], abs=12)
    assert pixels[:, 35, 59].tolist() == pytest.approx([255, 255, 255], abs=12)


def test_cmyk_jpeg_gives_the_rgb_it_encodes(tmp_path: Path):
    rgb = class_image(2, 3, (48, 48), np.random.default_rng(2))
    path = write_kind("cmyk_jpeg", tmp_path / "cmyk", rgb)
    assert Image.open(path).mode == "CMYK"
    assert (decode_image_file(path).float() - chw(rgb).float()).abs().mean() < 6


def test_crop_keeps_the_centre():
    wide = chw(thirds(60, 180))
    out = preprocess(wide, Preprocessing(3, (30, 30), "crop"))
    assert out.shape == (3, 30, 30) and out.is_contiguous()
    assert out[1, :, 2:28].min() > 200 and out[0, :, 2:28].max() < 40 and out[2, :, 2:28].max() < 40
    tall = chw(thirds(60, 180).transpose(1, 0, 2))  # 180 x 60, thirds top to bottom
    assert preprocess(tall, Preprocessing(3, (30, 30), "crop"))[1, 2:28].min() > 200


def test_pad_fits_the_image_between_black_bars():
    wide = torch.full((1, 60, 180), 200, dtype=torch.uint8)
    out = preprocess(wide, Preprocessing(1, (60, 60), "pad"))
    assert out[:, :20].max() == 0 and out[:, 40:].max() == 0 and (out[:, 20:40] == 200).all()
    tall = torch.full((3, 90, 40), 200, dtype=torch.uint8)  # fits as 60 x 27: 16 + 17 columns of bars
    out = preprocess(tall, Preprocessing(3, (60, 60), "pad"))
    assert out[:, :, :16].max() == 0 and out[:, :, 43:].max() == 0 and (out[:, :, 16:43] == 200).all()


def test_stretch_keeps_everything():
    out = preprocess(chw(thirds(60, 180)), Preprocessing(3, (30, 30), "stretch"))
    assert out[0, :, :8].min() > 200 and out[1, :, 11:19].min() > 200 and out[2, :, 22:].min() > 200


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_of_the_target_shape_comes_back_unchanged(mode: str, channels: int):
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (channels, 28, 20), dtype=torch.uint8, generator=generator)
    assert torch.equal(preprocess(image, Preprocessing(channels, (28, 20), mode)), image)


def test_channels_are_repeated_or_made_grey():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(preprocess(image, Preprocessing(1, (8, 8))), F.rgb_to_grayscale(image))
    out = preprocess(image[:1], Preprocessing(3, (8, 8)))
    assert out.is_contiguous() and all(torch.equal(out[channel], image[0]) for channel in range(3))


def test_preprocess_refuses_what_is_not_uint8_chw():
    with pytest.raises(ValueError, match="expected uint8"):
        preprocess(torch.zeros(3, 8, 8), Preprocessing(3, (8, 8)))
    with pytest.raises(ValueError, match="expected uint8"):
        preprocess(torch.zeros(4, 8, 8, dtype=torch.uint8), Preprocessing(3, (8, 8)))


@pytest.mark.parametrize(
    "prep, orientation",
    [
        (Preprocessing(3, (64, 64), "crop"), None),
        (Preprocessing(3, (96, 32), "pad"), 6),
        (Preprocessing(1, (300, 60), "stretch"), 8),  # only a bound on displayed axes fits
    ],
)
def test_jpeg_draft_decoding_is_repeatable_and_close_to_full(tmp_path: Path, prep, orientation):
    rgb = class_image(3, 4, (900, 1200), np.random.default_rng(3))
    path = tmp_path / "big.jpg"
    write_rgb_jpeg(path, rgb) if orientation is None else write_exif_jpeg(path, rgb, orientation)
    drafted, full = decode_image_file(path, target=prep), decode_image_file(path)
    assert full.shape == (3, 900, 1200) and drafted.shape[1] < 900  # libjpeg scaled it down
    need = resized_size((900, 1200), prep)
    assert drafted.shape[1] >= need[0] and drafted.shape[2] >= need[1]  # resize only shrinks
    assert torch.equal(decode_image_file(path, target=prep), drafted)
    loaded = load_image(path, prep)
    assert torch.equal(load_image(path, prep), loaded)
    assert (loaded.float() - preprocess(full, prep).float()).abs().mean() < 2


def test_draft_changes_nothing_when_no_reduction_fits(tmp_path: Path):
    write_rgb_jpeg(tmp_path / "small.jpg", class_image(0, 3, (80, 100), np.random.default_rng(4)))
    prep = Preprocessing(3, (64, 64), "crop")
    path = tmp_path / "small.jpg"
    assert torch.equal(decode_image_file(path, target=prep), decode_image_file(path))


def test_a_truncated_jpeg_cannot_be_decoded(tmp_path: Path):
    write_rgb_jpeg(tmp_path / "whole.jpg", class_image(0, 3, (64, 64), np.random.default_rng(5)))
    blob = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageFileError, match="cannot be decoded: .*truncated"):
        decode_image_file(tmp_path / "cut.jpg")


def test_a_text_file_named_png_is_refused_before_decoding(tmp_path: Path):
    (tmp_path / "notes.png").write_text("not a picture\n")
    for read in (decode_image_file,):
        with pytest.raises(ImageFileError, match="not a PNG, JPEG, GIF or WebP"):
            read(tmp_path / "notes.png")


def test_a_png_with_damaged_pixels_cannot_be_decoded(tmp_path: Path):
    Image.fromarray(class_image(0, 3, (32, 32), np.random.default_rng(6))).save(tmp_path / "ok.png")
    blob = bytearray((tmp_path / "ok.png").read_bytes())
    start = blob.index(b"IDAT") + 8
    blob[start : start + 64] = bytes(64)  # zeroed compressed data
    (tmp_path / "bad.png").write_bytes(bytes(blob))
    with pytest.raises(ImageFileError, match="cannot be decoded"):
        decode_image_file(tmp_path / "bad.png")


def test_too_many_pixels_are_refused_from_the_header(tmp_path: Path):
    write_rgb_jpeg(tmp_path / "big.jpg", np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageFileError, match="over the limit"):
        decode_image_file(tmp_path / "big.jpg", max_pixels=5_000)


SIZES = [(height, width) for height in (24, 40, 64, 96, 120) for width in (24, 48, 72, 100, 120)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, list[Path]]:
    return write_class_folders(tmp_path_factory.mktemp("folders"), ["ant", "bee", "cat"], 200, SIZES)


def test_class_folders_mix_every_kind_and_size(folders):
    assert sum(len(paths) for paths in folders.values()) == 600
    for paths in folders.values():
        assert {path.name.split("-", 1)[1].split(".")[0] for path in paths} == set(KINDS)
    headers = [check_image_file(path) for paths in folders.values() for path in paths]
    shapes = {(header.width, header.height) for header in headers}
    assert len(shapes) >= 20


def test_class_folders_are_the_same_for_a_seed(tmp_path: Path):
    first = write_class_folders(tmp_path / "first", ["a", "b", "c"], 20, SIZES[:4], seed=7)
    second = write_class_folders(tmp_path / "second", ["a", "b", "c"], 20, SIZES[:4], seed=7)
    pairs = [(one, two) for name in first for one, two in zip(first[name], second[name])]
    assert len(pairs) == 60 and all(one.read_bytes() == two.read_bytes() for one, two in pairs)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_class_folders_are_learnable_in_grey_after_any_resize(folders, mode: str):
    """A linear probe on 16x16 grey pixels already tells the classes apart; a CNN does better."""
    paths = [path for name in folders for path in folders[name][:80]]
    labels = torch.arange(3).repeat_interleave(80)
    features = (
        torch.stack([load_image(p, Preprocessing(1, (16, 16), mode)) for p in paths]).flatten(1).float() / 255
    )
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    train = torch.arange(len(labels)) % 4 != 0
    x, targets = features[train], torch.nn.functional.one_hot(labels[train], 3).float()
    weights = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1]), x.T @ targets)  # ridge regression
    accuracy = ((features[~train] @ weights).argmax(1) == labels[~train]).float().mean()
    assert accuracy >= 0.9, f"{mode}: held-out accuracy {accuracy:.2f}"
