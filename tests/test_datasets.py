import gzip
from pathlib import Path

import pytest
import torch

from tasks.data import datasets
from tasks.data.datasets import channel_stats, load_source, load_tensors, prepare_dataset, tensor_digest
from tasks.data.images import ImageData, check_image_data


def test_prepare_stores_tensors_and_describes_them(tmp_path):
    ref = prepare_dataset("synthetic", tmp_path)
    assert Path(ref.tensors_path).parent == tmp_path / "prepared"
    assert (ref.channels, ref.image_size, ref.num_classes) == (1, (28, 28), 10)
    data = load_tensors(ref.tensors_path)
    assert len(data.train_labels) == ref.train_size and len(data.test_labels) == ref.test_size
    assert ref == prepare_dataset("synthetic", tmp_path)  # same data, same fingerprint


def test_csv_dataset_through_prepare(png_dataset, tmp_path):
    ref = prepare_dataset("csv", tmp_path / "data", **png_dataset)
    assert ref.class_names == ("left", "right") and ref.image_size == (12, 12)


def test_digest_changes_with_one_pixel():
    data = load_source("synthetic", Path("unused"))
    changed = data.train_images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert tensor_digest(data) != tensor_digest(data._replace(train_images=changed))


def test_channel_stats_per_channel():
    images = torch.stack([torch.zeros(8, 8), torch.full((8, 8), 255.0)]).to(torch.uint8).unsqueeze(0)
    mean, std = channel_stats(images.expand(3, -1, -1, -1))
    assert mean == pytest.approx((0.0, 1.0)) and min(std) > 0


def test_unknown_dataset_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'nope'.*synthetic"):
        load_source("nope", tmp_path)


def test_inconsistent_data_is_rejected():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    bad = ImageData(images, torch.tensor([0, 1, 2, 3]), images, torch.zeros(4, dtype=torch.long), ("a", "b"))
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 2\)"):
        check_image_data(bad)


def test_test_pixels_scale_and_limit(tmp_path):
    ref = prepare_dataset("synthetic", tmp_path)
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
    first = prepare_dataset("fashion-mnist", tmp_path)

    def unread(*args, **kwargs):
        raise AssertionError("the raw files were read again")

    monkeypatch.setattr(datasets, "load_source", unread)
    assert prepare_dataset("fashion-mnist", tmp_path) == first
    monkeypatch.undo()

    # Other raw files (here: one label changed) make a new prepared copy.
    labels = raw / "train-labels-idx1-ubyte"
    blob = bytearray(labels.read_bytes())
    blob[-1] = (blob[-1] + 1) % 10
    labels.write_bytes(bytes(blob))
    changed = prepare_dataset("fashion-mnist", tmp_path)
    assert changed.sha256 != first.sha256 and Path(changed.tensors_path).exists()

    # A prepared file that lost bytes is not trusted: it is prepared again from the raw files.
    tensors = Path(changed.tensors_path)
    tensors.write_bytes(tensors.read_bytes()[:-10])
    assert prepare_dataset("fashion-mnist", tmp_path) == changed
    assert load_tensors(changed.tensors_path).train_labels[-1] == blob[-1]
