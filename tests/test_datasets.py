import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.data import datasets
from tasks.data.datasets import channel_stats, load_tensors, prepare_dataset, tensor_digest
from tasks.data.images import ImageData, check_image_data
from tasks.data.sources import CsvSource, DigitsSource, FashionMnistSource, Shape, SyntheticSource

REPO = Path(__file__).resolve().parents[1]


def test_prepare_stores_tensors_and_describes_them(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path)
    assert Path(ref.prepared_path).parent == tmp_path / "prepared"
    assert (ref.channels, ref.image_size, ref.num_classes) == (1, (28, 28), 10)
    data = load_tensors(ref.prepared_path)
    assert len(data.train_labels) == ref.train_size and len(data.test_labels) == ref.test_size
    assert ref == prepare_dataset(SyntheticSource(), tmp_path)  # same data, same fingerprint


@pytest.mark.slow
def test_csv_dataset_through_prepare(png_dataset, tmp_path):
    ref = prepare_dataset(CsvSource(**png_dataset), tmp_path / "data")
    assert ref.class_names == ("left", "right") and ref.image_size == (12, 12)


def test_the_prepared_file_is_safetensors_and_maps_without_copying(tmp_path):
    from safetensors.numpy import load_file

    ref = prepare_dataset(SyntheticSource(), tmp_path)
    mapped = load_tensors(ref.prepared_path)
    arrays = load_file(ref.prepared_path)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert (arrays[name] == getattr(mapped, name).numpy()).all()
    assert mapped.train_images.numpy().base is not None  # a view of the mapping, not a copy
    assert tensor_digest(SyntheticSource().load(tmp_path)) == ref.sha256  # the same digest as before


def test_in_memory_data_takes_the_asked_preprocessing(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path, shape=Shape("3", (20, 24), "pad"))
    images = load_tensors(ref.prepared_path).train_images
    assert (ref.channels, ref.image_size, ref.resize_mode) == (3, (20, 24), "pad")
    assert images.shape[1:] == (3, 20, 24) and torch.equal(images[:, 0], images[:, 2])


def test_digest_changes_with_one_pixel():
    data = SyntheticSource().load(Path("unused"))
    changed = data.train_images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert tensor_digest(data) != tensor_digest(data._replace(train_images=changed))


def test_channel_stats_per_channel():
    images = torch.stack([torch.zeros(8, 8), torch.full((8, 8), 255.0)]).to(torch.uint8).unsqueeze(0)
    mean, std = channel_stats(images.expand(3, -1, -1, -1))
    assert mean == pytest.approx((0.0, 1.0)) and min(std) > 0


def test_inconsistent_data_is_rejected():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    bad = ImageData(images, torch.tensor([0, 1, 2, 3]), images, torch.zeros(4, dtype=torch.long), ("a", "b"))
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 2\)"):
        check_image_data(bad)


def test_test_pixels_scale_and_limit(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path)
    first = datasets.test_pixels(ref, 3)
    assert (
        first.shape == (3, 1, 28, 28)
        and first.dtype == torch.float32
        and 0 <= first.min() <= first.max() <= 1
    )
    assert torch.equal(first, datasets.test_pixels(ref)[:3])


def write_raw_fashion(data_dir, files):
    raw = data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    return raw


def test_a_prepared_copy_of_the_same_raw_files_is_reused_without_reading_them(
    tiny_fashion, tmp_path, monkeypatch
):
    raw = write_raw_fashion(tmp_path, tiny_fashion)
    first = prepare_dataset(FashionMnistSource(), tmp_path)

    def unread(*args, **kwargs):
        raise AssertionError("the raw files were read again")

    monkeypatch.setattr(FashionMnistSource, "load", unread)
    assert prepare_dataset(FashionMnistSource(), tmp_path) == first
    monkeypatch.undo()

    # Other raw files (here: one label changed) make a new prepared copy.
    labels = raw / "train-labels-idx1-ubyte"
    blob = bytearray(labels.read_bytes())
    blob[-1] = (blob[-1] + 1) % 10
    labels.write_bytes(bytes(blob))
    changed = prepare_dataset(FashionMnistSource(), tmp_path)
    assert changed.sha256 != first.sha256 and Path(changed.prepared_path).exists()

    # A prepared file that lost bytes is not trusted: it is prepared again from the raw files.
    tensors = Path(changed.prepared_path)
    tensors.write_bytes(tensors.read_bytes()[:-10])
    assert prepare_dataset(FashionMnistSource(), tmp_path) == changed
    assert load_tensors(changed.prepared_path).train_labels[-1] == blob[-1]


def damage(path: Path, how: str) -> None:
    """Truncates `path`, or flips one byte in the middle of it (same size, same mtime)."""
    blob, stat = bytearray(path.read_bytes()), path.stat()
    if how == "truncated":
        del blob[-100:]
    else:
        blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def damage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]


@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_a_damaged_mnist_family_file_is_detected_and_rebuilt_from_the_raw_files(
    tiny_fashion, tmp_path, caplog, how
):
    write_raw_fashion(tmp_path, tiny_fashion)
    first = prepare_dataset(FashionMnistSource(), tmp_path)
    tensors = Path(first.prepared_path)
    whole = tensors.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert prepare_dataset(FashionMnistSource(), tmp_path) == first
        assert not damage_lines(caplog)  # a whole file is reused silently
        damage(tensors, how)
        assert prepare_dataset(FashionMnistSource(), tmp_path) == first
    [line] = damage_lines(caplog)
    assert str(tensors) in line and "rebuilding it from the source" in line
    assert tensors.read_bytes() == whole
    assert torch.equal(load_tensors(first.prepared_path).train_images[:, 0], gzip_images(tiny_fashion))


def gzip_images(files: dict[str, bytes]) -> torch.Tensor:
    raw = gzip.decompress(files["train-images-idx3-ubyte.gz"])[16:]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 28, 28)


@pytest.mark.parametrize("how", ["truncated", "altered", "unrecorded"])
def test_a_damaged_generated_file_is_detected_and_rebuilt(tmp_path, caplog, how):
    ref = prepare_dataset(SyntheticSource(), tmp_path)
    tensors = Path(ref.prepared_path)
    whole = tensors.read_bytes()
    if how == "unrecorded":
        tensors.with_name(tensors.name + ".json").unlink()
    else:
        damage(tensors, how)
    with caplog.at_level(logging.WARNING):
        assert prepare_dataset(SyntheticSource(), tmp_path) == ref
        assert prepare_dataset(SyntheticSource(), tmp_path) == ref  # rebuilt once, then whole again
    [line] = damage_lines(caplog)
    assert str(tensors) in line and "rebuilding it from the source" in line
    assert tensors.read_bytes() == whole
    assert len(load_tensors(ref.prepared_path).train_labels) == ref.train_size


def test_every_prepared_file_has_a_record_of_its_size_and_digest(tiny_fashion, tmp_path):
    write_raw_fashion(tmp_path, tiny_fashion)
    for ref in (prepare_dataset(FashionMnistSource(), tmp_path), prepare_dataset(DigitsSource(), tmp_path)):
        tensors = Path(ref.prepared_path)
        record = json.loads(tensors.with_name(tensors.name + ".json").read_text())
        assert record == {"bytes": tensors.stat().st_size, "sha256": file_sha256(tensors)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_writers_of_the_same_data_write_the_same_bytes(tmp_path):
    first, second = (prepare_dataset(SyntheticSource(), tmp_path / name) for name in ("a", "b"))
    assert Path(first.prepared_path).read_bytes() == Path(second.prepared_path).read_bytes()


# Says it is ready, waits for the go file, so the runs prepare at the same moment, then prints
# the DatasetRef's sha256 and the prepared file's.
PREPARE_WHEN_TOLD = """
import hashlib, sys, time
from pathlib import Path
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.sources import SyntheticSource
data_dir, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
ref = prepare_dataset(SyntheticSource(), data_dir)
assert len(load_tensors(ref.prepared_path).test_labels) == ref.test_size
print(ref.sha256, hashlib.sha256(Path(ref.prepared_path).read_bytes()).hexdigest())
"""


@pytest.mark.slow
def test_three_runs_prepare_one_dataset_at_once(tmp_path):
    """(Concurrent downloads and extraction of raw files: tests/test_mnist_files.py.)"""
    data_dir, go = tmp_path / "data", tmp_path / "go"
    ready = [tmp_path / f"ready-{index}" for index in range(3)]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE_WHEN_TOLD, str(data_dir), str(go), str(flag)],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # three runs on few cores
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in results]
    assert len({out for out, _ in results}) == 1 and not any("damaged" in err for _, err in results)
    [tensors] = (data_dir / "prepared").glob("*.safetensors")
    assert results[0][0].split()[1] == file_sha256(tensors)
    assert not [p.name for p in data_dir.rglob("*") if p.name.endswith(".part")]
