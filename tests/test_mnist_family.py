import gzip

import pytest
from pydantic import ValidationError

from common.path_settings import path_marks
from tasks.data.sources import FashionMnistSource, MnistSource, Shape


def test_origins_are_the_mirror_files_with_credentials_left_out():
    train, test = FashionMnistSource().origins()
    assert train == FashionMnistSource.first_mirror + "train-images-idx3-ubyte.gz"
    assert test == FashionMnistSource.first_mirror + "t10k-images-idx3-ubyte.gz"
    secret = MnistSource(mirror="https://me:pa55@mirror.example/mnist").origins()[0]
    assert secret == "https://***@mirror.example/mnist/train-images-idx3-ubyte.gz"


def test_a_mirror_is_a_web_or_file_url_and_a_file_one_names_a_path():
    with pytest.raises(ValidationError, match="should match pattern"):
        MnistSource(mirror="ftp://mirror.example/")
    [mark] = path_marks(FashionMnistSource.model_fields["mirror"].metadata)
    assert mark.path("file:///srv/mnist/") == "/srv/mnist/" and mark.path("https://m/") is None


def test_raw_files_key_the_prepared_copy_once_they_are_there(tiny_fashion, tmp_path):
    source = FashionMnistSource()
    plan = source.plan(tmp_path, Shape(), 1, None)
    assert plan.key() is None  # not downloaded yet
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in tiny_fashion.items():
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    assert plan.key() is not None and plan.key() != source.plan(tmp_path, Shape("3"), 1, None).key()
    contents = plan.contents()
    assert len(contents.train_labels) == 20 and contents.class_names[0] == "T-shirt/top"
    assert source.default_augment(1) == "none"
