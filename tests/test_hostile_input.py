"""Hostile input is refused before any training or prediction, with a message naming it."""

import io
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEMORY_PROBE, run_train_script, write_csv
from photos import gif_bomb, many_frame_gif, save_striped_png
from PIL import Image
from registered_models import Recording
from torchvision.io import encode_jpeg, write_png
from torchvision.transforms.v2.functional import resize

from flows.cli import parse_config, short_user_errors
from flows.config import PredictConfig, TrainConfig
from flows.sweep_config import parse_sweep_config
from tasks.data.csv_images import CsvDatasetError, read_rows
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.decoding import Preprocessing, decode_image_file, load_image
from tasks.data.images import DEFAULT_MAX_PIXELS, ImageFileError, check_image_file, read_image_header
from tasks.data.photos import ImageFolderError, list_csv
from tasks.data.sources import CsvSource
from tasks.predict.image_inputs import Inputs, PredictionError, csv_inputs, folder_inputs
from tasks.predict.prediction import RegisteredModel, predict_to_csv, to_pixels
from tasks.predict.steps import list_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A valid 1-bit greyscale PNG of 30000x30000 black pixels: ~110 kB that decode to 900 MB."""
    side = 30000
    row = bytes(1 + side // 8)  # filter byte 0, then 8 pixels a byte
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(
        PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )
    assert path.stat().st_size < 200_000
    return path


@pytest.fixture
def decoder_calls(monkeypatch):
    """Every path PIL is asked to open, which is where decode_image_file decodes (after its own
    header check), in this process: prepare_dataset decodes here with its default one worker."""
    calls, real = [], Image.open

    def spy(source, *args, **kwargs):
        calls.append(str(getattr(source, "name", source)))  # a path, or the file open_image opened
        return real(source, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return calls


# 1. Names


@pytest.mark.parametrize(
    "flag,value,named",
    [
        ("--registered-model", "a'b", "a'b: contains \"'\""),
        ("--registered-model", 'a"b', "contains '\"'"),
        ("--registered-model", "a/b", "a/b: contains '/'"),
        ("--registered-model", "a\\b", "contains '\\\\'"),
        ("--registered-model", "a\x1b[31mb", "'a\\x1b[31mb': contains '\\x1b'"),
        ("--experiment", "line\nbreak", "--experiment 'line\\nbreak': contains '\\n'"),
        ("--experiment", "x" * 257, "257 characters; a name takes at most 256"),
        ("--registered-model", "x" * 252, "252 characters; a name takes at most 251 (256 less the '-onnx'"),
    ],
)
def test_hostile_names_exit_2_at_flag_parsing(flag, value, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "\x1b" not in err and "\nbreak" not in err
    assert "other than quotes (' \"), slashes (/ \\) and control characters" in err or "at most" in err


def test_names_at_the_limits_and_derived_names_are_valid(capsys):
    assert parse_config(["--registered-model", "m" * 251, "--experiment", "e" * 256]).model_name == "m" * 251
    for dataset in ("fashion-mnist", "mnist", "synthetic", "digits"):
        for model in ("mlp", "cnn"):
            name = TrainConfig(dataset=dataset, model=model).model_name
            assert TrainConfig(dataset=dataset, model=model, registered_model=name).model_name == name
    assert PredictConfig(registered_model="m" * 251, image_dir="x").registry_name == "m" * 251 + "-onnx"
    for flags in (["--registered-model", "a/b"], ["--registered-model", "m", "--experiment", "e'"]):
        with pytest.raises(SystemExit):
            parse_config([*flags, "--image-dir", "x"], PredictConfig)
        assert "contains" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_sweep_config(["--grid", "lr=0.1,0.2", "--registered-model", "sweep'"])
    assert "--registered-model sweep': contains" in capsys.readouterr().err


# 2. Paths that leave the image root


@pytest.fixture
def outside_png(tmp_path):
    """A real PNG next to, not under, the png_dataset's image root."""
    path = tmp_path.parent / f"{tmp_path.name}-outside.png"
    write_png(torch.zeros(1, 12, 12, dtype=torch.uint8), str(path))
    yield path
    path.unlink()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_leaving_the_image_root_are_refused(kind, png_dataset, outside_png, tmp_path, decoder_calls):
    root = png_dataset["image_root"]
    name = {"dotdot": f"../{outside_png.name}", "absolute": str(outside_png), "symlink": "img/link.png"}[kind]
    (root / "img" / "link.png").symlink_to(outside_png)
    write_csv(png_dataset["train_csv"], [("img/000.png", "left"), (name, "right")])
    message = rf"train.csv row 3: image '{name}' resolves to '{outside_png}', outside the image root {root}"
    with pytest.raises(CsvDatasetError, match=message):
        list_csv(**png_dataset)
    with pytest.raises(CsvDatasetError, match=message):  # the training dataset, before decoding
        prepare_dataset(CsvSource(**png_dataset), tmp_path / "data")
    with pytest.raises(CsvDatasetError, match=message):  # prediction CSVs too
        csv_inputs(png_dataset["train_csv"], root, ["left", "right"])
    assert decoder_calls == []


@pytest.mark.slow
def test_etc_passwd_and_symlinks_inside_the_root(png_dataset):
    root = png_dataset["image_root"]
    write_csv(png_dataset["test_csv"], [("../../../../../../../../etc/passwd.png", "left")])
    with pytest.raises(
        CsvDatasetError, match=r"test.csv row 2: image '.*etc/passwd.png' resolves to '/etc/passwd"
    ):
        read_rows(png_dataset["test_csv"], root)
    (root / "inside.png").symlink_to(root / "img" / "001.png")  # a link that stays inside is fine
    write_csv(png_dataset["test_csv"], [("inside.png", "right"), ("img/../img/000.png", "left")])
    assert list_csv(**png_dataset).test[1] == (1, 0)
    data = load_tensors(prepare_dataset(CsvSource(**png_dataset), root / "data").prepared_path)
    assert torch.equal(data.test_images[0], data.train_images[1])  # 001.png, through the link
    assert torch.equal(data.test_images[1], data.train_images[0])


# 3. Files that are not images


def test_text_with_an_image_suffix_is_refused_by_its_first_bytes(png_dataset, decoder_calls):
    root = png_dataset["image_root"]
    (root / "img" / "002.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(
        CsvDatasetError,
        match=r"train.csv row 4: image 'img/002.png': it is not a PNG, JPEG, GIF or WebP image",
    ):
        prepare_dataset(CsvSource(**png_dataset), png_dataset["image_root"] / "data")
    with pytest.raises(PredictionError, match=r"img/002.png: it is not a PNG, JPEG, GIF or WebP image"):
        folder_inputs(root / "img")
    (root / "img" / "002.png").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")  # JPEG magic, no frame
    with pytest.raises(CsvDatasetError, match="row 4: .* a JPEG file without a readable frame header"):
        read_rows(png_dataset["train_csv"], root)
    assert decoder_calls == []


def image_bytes(kind: str, width: int, height: int) -> bytes:
    pixels = np.zeros((height, width, 3), np.uint8)
    if kind == "jpeg":
        return encode_jpeg(torch.from_numpy(pixels).permute(2, 0, 1).contiguous()).numpy().tobytes()
    out = io.BytesIO()
    Image.fromarray(pixels).save(
        out,
        {"gif": "GIF", "webp": "WEBP", "webp-lossless": "WEBP", "bmp": "BMP"}[kind],
        **({"lossless": True} if kind == "webp-lossless" else {}),
    )
    return out.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "gif", "webp", "webp-lossless"])
def test_headers_of_every_decodable_format_give_the_size(kind, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(image_bytes(kind, 13, 7))
    assert read_image_header(path)[1:] == (13, 7, True)  # width, height, colour
    assert tuple(decode_image_file(path).shape) == (3, 7, 13)


def test_formats_the_decoder_cannot_read_are_refused(tmp_path):
    path = tmp_path / "a.bmp"
    path.write_bytes(image_bytes("bmp", 4, 4))
    with pytest.raises(ImageFileError, match="not a PNG, JPEG, GIF or WebP image"):
        check_image_file(path)
    with pytest.raises(ImageFileError, match="not a PNG, JPEG, GIF or WebP image"):
        decode_image_file(path)  # though PIL reads BMP: only the format the header check judged


@pytest.mark.slow
def test_undecodable_files_are_named_by_the_training_and_prediction_decoders(png_dataset, tmp_path):
    root = png_dataset["image_root"]
    image = root / "img" / "040.png"  # in the test split
    image.write_bytes(image.read_bytes()[:60])  # a sound header, then the data cut short
    assert list_csv(**png_dataset).sizes == {(12, 12)}  # listing reads headers only
    named = rf"^{re.escape(str(image))}: it cannot be decoded: "
    with pytest.raises(ImageFolderError, match=named):  # from a decoding worker process
        prepare_dataset(CsvSource(**png_dataset), tmp_path / "data", workers=2)
    assert not list((tmp_path / "data" / "prepared").iterdir())
    inputs = csv_inputs(png_dataset["test_csv"], root, ["left", "right"])
    with pytest.raises(
        CsvDatasetError, match=rf"test.csv row 6: {re.escape(str(image))}: it cannot be decoded"
    ):
        list(inputs.batches(4, Preprocessing(1, (12, 12))))


# 4. Decompression bombs


def test_a_png_bomb_is_refused_from_its_header_never_decoded(bomb_png, png_dataset, decoder_calls):
    root = png_dataset["image_root"]
    shutil.copy(bomb_png, root / "img" / "bomb.png")
    write_csv(png_dataset["train_csv"], [("img/000.png", "left"), ("img/bomb.png", "right")])
    declared = r"its PNG header declares 30000x30000 = 900,000,000 pixels, over the limit of 50,000,000"
    with pytest.raises(CsvDatasetError, match=rf"train.csv row 3: image 'img/bomb.png': {declared}"):
        prepare_dataset(CsvSource(**png_dataset), root / "data")
    with pytest.raises(PredictionError, match=f"bomb.png: {declared}"):
        folder_inputs(root / "img")
    assert decoder_calls == []
    # Straight to the decoding step, as a partition would be: still refused before the decoder.
    folder = Inputs("folder", str(root / "img"), 0, 2, names=("000.png", "bomb.png"))
    with pytest.raises(CsvDatasetError, match=f"bomb.png: {declared}"):
        list(folder.batches(2, Preprocessing(1, (12, 12))))
    with pytest.raises(ImageFileError, match=declared):
        load_image(root / "img" / "bomb.png", Preprocessing(1, (12, 12)))
    assert decoder_calls == [str(root / "img" / "000.png")]  # the sound image before it was decoded


@pytest.mark.slow
def test_the_pixel_limit_is_a_setting(png_dataset, tmp_path, capsys):
    assert CsvSource.model_fields["max_image_pixels"].default == DEFAULT_MAX_PIXELS
    assert PredictConfig(registered_model="m", image_dir="x").max_image_pixels == DEFAULT_MAX_PIXELS
    over = r"row 2: image 'img/000.png': .* 12x12 = 144 pixels, over the limit of 143"
    with pytest.raises(CsvDatasetError, match=over):
        list_csv(**png_dataset, max_pixels=143)
    with pytest.raises(CsvDatasetError, match=over):
        prepare_dataset(CsvSource(**png_dataset, max_image_pixels=143), tmp_path / "data")
    assert len(list_csv(**png_dataset, max_pixels=144).train[1]) == 36
    ref = prepare_dataset(CsvSource(**png_dataset, max_image_pixels=144), tmp_path / "data")
    assert ref.train_size == 36
    csv = png_dataset["test_csv"]
    with pytest.raises(CsvDatasetError, match="over the limit of 100"):
        csv_inputs(csv, png_dataset["image_root"], ["left", "right"], max_pixels=100)
    image = png_dataset["image_root"] / "img" / "000.png"
    with pytest.raises(ImageFileError, match="over the limit of 100"):
        decode_image_file(image, max_pixels=100)
    with pytest.raises(ImageFileError, match="over the limit of 100"):
        load_image(image, Preprocessing(1, (4, 4)), max_pixels=100)
    folder = Inputs("folder", str(image.parent), 0, 1, names=("000.png",), max_pixels=100)
    with pytest.raises(CsvDatasetError, match="000.png: .*over the limit of 100"):
        list(folder.batches(1, Preprocessing(1, (12, 12))))
    jpeg = tmp_path / "wide.jpg"  # a JPEG frame header (SOF0) declaring 60000x60000
    frame = struct.pack(">BHHB", 8, 60000, 60000, 1) + b"\x01\x11\x00"
    jpeg.write_bytes(
        b"\xff\xd8"
        + b"\xff\xe0"
        + struct.pack(">H", 4)
        + b"xx"
        + b"\xff\xc0"
        + struct.pack(">H", 2 + len(frame))
        + frame
    )
    with pytest.raises(ImageFileError, match="its JPEG header declares 60000x60000 = 3,600,000,000 pixels"):
        check_image_file(jpeg)
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "folder", "--train-dir", "x", "--max-image-pixels", "0"])
    assert "--max-image-pixels 0" in capsys.readouterr().err


# Prepares each CSV pair named on the command line in a fresh process, then prints what happened
# and the peak resident memory of this process and of its (forked) decoding workers, in bytes.
MEASURE_PREPARATION = (
    MEMORY_PROBE
    + """
import json, resource, sys
from pathlib import Path
from tasks.data.csv_images import CsvDatasetError
from tasks.data.datasets import Shape, load_tensors, prepare_dataset
from tasks.data.sources import CsvSource

root, outcomes = Path(sys.argv[1]), {}
imports, anonymous = peak_bytes(), AnonPeak()
for name in sys.argv[2:]:
    csvs = {"train_csv": root / f"{name}-train.csv", "test_csv": root / f"{name}-test.csv"}
    try:
        ref = prepare_dataset(CsvSource(image_root=root, **csvs), root / "data", shape=Shape(size=(28, 28)),
                              workers=2)
        data = load_tensors(ref.prepared_path)
        outcomes[name] = [data.train_images.flatten(1).float().mean(1).tolist(),
                          data.test_images.flatten(1).float().mean(1).tolist()]
    except CsvDatasetError as error:
        outcomes[name] = str(error)
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # forked, not exec'd
print(json.dumps({"outcomes": outcomes, "imports": imports, "rss": peak_bytes(), "self": anonymous.stop(),
                  "workers": workers}))
"""
)


@pytest.mark.slow
def test_bombs_many_frames_and_a_large_image_repeated_prepare_in_bounded_memory(tmp_path):
    """The acceptance check for training memory: the GIF bomb refused from its headers, a GIF of
    5,000 frames prepared from its first, and a 7000x7000 PNG listed 1,000 times decoded once;
    the preparing process and each decoding worker stay under 1 GB resident."""
    (tmp_path / "bomb.gif").write_bytes(gif_bomb())
    (tmp_path / "frames.gif").write_bytes(many_frame_gif((28, 28), 5000))
    save_striped_png(tmp_path / "big.png", 7000)
    write_csv(tmp_path / "bomb-train.csv", [("frames.gif", "a"), ("bomb.gif", "b")])
    write_csv(tmp_path / "bomb-test.csv", [("frames.gif", "a")])
    write_csv(
        tmp_path / "big-train.csv", [("frames.gif", "a")] + [("big.png", "ab"[i % 2]) for i in range(1000)]
    )
    write_csv(tmp_path / "big-test.csv", [("big.png", "a"), ("frames.gif", "b")])
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PREPARATION, str(tmp_path), "bomb", "big"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    bomb, (train, test) = report["outcomes"]["bomb"], report["outcomes"]["big"]
    assert "row 3: image 'bomb.gif': its GIF header declares 40000x40000 = 1,600,000,000 pixels" in bomb
    assert train[0] == test[1] == 255.0  # the many-frame GIF: its first frame, white
    stripes = train[1]
    assert 0 < stripes < 255 and train[1:] == [stripes] * 1000 and test[0] == stripes  # one decode, copied
    assert report["self"] < 1 << 30 and report["workers"] < 1 << 30, report
    mib = {key: f"{report[key] / 2**20:.0f} MiB" for key in ("imports", "rss", "self", "workers")}
    print(
        f"peak RSS: after imports {mib['imports']}, preparing {mib['rss']} ({mib['self']} anonymous), "
        f"workers {mib['workers']};"
    )
    print(f"{time.monotonic() - started:.1f} s")


# 5. Broken CSVs


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"", r"train.csv: no image rows \(empty, or only a header\)"),
        (b"image,label\n\n", r"train.csv: no image rows \(empty, or only a header\)"),
        (
            b"img/000.png,left\nimg/caf\xe9.png,left\n",
            r"train.csv: not UTF-8 text \(byte 0xe9: invalid continuation byte\); save the CSV as UTF-8",
        ),
        (
            b"image,image\nimg/000.png,left\n",
            r"train.csv row 1: header \['image', 'image'\] repeats column 'image'",
        ),
        (b"image\nimg/000.png\n", r"train.csv row 1: header \['image'\] has no label column"),
        (b"image,label,split\nimg/000.png,left,a\n", r"train.csv row 1: header .* has more than two columns"),
        (b"img/000.png,left,extra\n", r"train.csv row 1: expected 'image path,label' rows, got \["),
        (b"img/000.png\n", r"train.csv row 1: expected 'image path,label' rows, got \['img/000.png'\]"),
    ],
)
def test_broken_csvs_are_refused_naming_the_file_and_problem(content, problem, png_dataset):
    png_dataset["train_csv"].write_bytes(content)
    with pytest.raises(CsvDatasetError, match=problem):
        list_csv(**png_dataset)


def test_prediction_csvs_may_lack_labels_but_not_rows(png_dataset, tmp_path):
    root, csv = png_dataset["image_root"], tmp_path / "predict.csv"
    csv.write_text("image\nimg/000.png\n")
    assert len(csv_inputs(csv, root, ["left"])) == 1
    csv.write_text("image\n")
    with pytest.raises(PredictionError, match=r"predict.csv: no image rows .* 'image path\[,label\]' rows"):
        csv_inputs(csv, root, ["left"])
    csv.write_text("path,path\nimg/000.png\n")
    with pytest.raises(CsvDatasetError, match="repeats column 'path'"):
        csv_inputs(csv, root, ["left"])
    with pytest.raises(CsvDatasetError, match="absent.csv: cannot open the CSV: No such file"):
        csv_inputs(tmp_path / "absent.csv", root, ["left"])


# 6. Images of another size than the model's


def test_other_sizes_are_resized_as_in_training_or_refused_with_no_resize(tmp_path):
    image = torch.arange(3 * 16 * 16, dtype=torch.int64).reshape(3, 16, 16).remainder(251).to(torch.uint8)
    stretch = Preprocessing(3, (8, 8), "stretch")
    expected = resize(image, [8, 8], antialias=True).float().numpy() / 255
    np.testing.assert_allclose(to_pixels([image], stretch)[0], expected)
    assert to_pixels([image], Preprocessing(1, (8, 8))).shape == (1, 1, 8, 8)

    folder = tmp_path / "images"
    folder.mkdir()
    write_png(image, str(folder / "a.png"))

    (folder / "list.csv").write_text("a.png\n")
    registered = RegisteredModel("models:/m/1", "1", "run", ("a", "b"), (3, 8, 8), stretch)
    where = {"folder": (None, None, folder), "csv": (folder / "list.csv", folder, None)}
    refused = re.escape("a.png: image is (16, 16) pixels, the model takes (8, 8) (height, width); ")
    refused += "prediction resizes images as training did unless --no-resize is given"
    for name, source in where.items():
        # --no-resize: refused from the headers while listing, before any image is decoded.
        with pytest.raises(PredictionError, match=refused):
            list_images.fn(*source, None, tmp_path, ["a", "b"], image_size=(8, 8), resize=False)
        inputs = list_images.fn(*source, None, tmp_path, ["a", "b"], image_size=(8, 8))
        model, output = Recording(), tmp_path / "out" / f"{name}.csv"
        assert predict_to_csv(model, inputs, registered, 4, output)["images"] == 1
        np.testing.assert_allclose(model.pixels[0][0], expected)  # the model's own preprocessing
    assert parse_config(["--registered-model", "m", "--image-dir", "x"], PredictConfig).resize
    flags = ["--registered-model", "m", "--image-dir", "x", "--no-resize"]
    assert not parse_config(flags, PredictConfig).resize


# 7. The console


def test_console_logs_of_user_errors_lose_their_traceback_only():
    stream, kept = io.StringIO(), []
    console = logging.StreamHandler(stream)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    collector = logging.Handler()
    collector.emit = kept.append  # like Prefect's API handler: sees the record after the console
    logger = logging.getLogger("tests.hostile_input")
    logger.propagate, original = False, console.formatter
    logger.addHandler(console)
    logger.addHandler(collector)
    try:
        with short_user_errors((CsvDatasetError,), loggers=(logger,)):
            for error in (CsvDatasetError("train.csv row 3: bad"), RuntimeError("a real bug")):
                try:
                    raise error
                except Exception as caught:
                    logger.exception("failed: %r", caught)
    finally:
        logger.removeHandler(console)
        logger.removeHandler(collector)
    text = stream.getvalue()
    assert text.startswith(
        "ERROR failed: CsvDatasetError('train.csv row 3: bad')\nERROR failed: RuntimeError"
    )
    assert text.count("Traceback") == 1 and "RuntimeError: a real bug" in text
    assert console.formatter is original and all(record.exc_info for record in kept)


@pytest.mark.slow
def test_script_refuses_a_hostile_csv_in_one_line(png_dataset, outside_png, tmp_path):
    root = png_dataset["image_root"]
    write_csv(png_dataset["train_csv"], [("img/000.png", "left"), (f"../{outside_png.name}", "right")])
    result = run_train_script(
        tmp_path,
        *("--dataset", "csv", "--epochs", "1", "--output-dir", str(tmp_path / "out")),
        *("--train-csv", str(png_dataset["train_csv"]), "--test-csv", str(png_dataset["test_csv"])),
        *("--image-root", str(root), "--data-dir", str(tmp_path / "data")),
        timeout=300,
        seeded=True,
    )
    assert result.returncode != 0
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"{png_dataset['train_csv']} row 3: image '../{outside_png.name}' resolves to" in error
    assert "outside the image root" in error
    assert "Traceback" not in result.stdout + result.stderr
    assert not list((tmp_path / "out").rglob("model_weights.pth"))
