import json

from mlflow import MlflowClient

from tasks.data.datasets import DatasetRef
from tasks.data.sources import FashionMnistSource, MnistSource, SyntheticSource
from tasks.track import tracking
from tasks.track.lineage import image_splits, log_splits, origin_source

SHA = "0123456789abcdef" * 4


def ref(
    train_origin: str = "tasks.data.offline_data.load_digits",
    test_origin: str = "tasks.data.offline_data.load_digits",
):
    return DatasetRef(
        "digits",
        "/x.pt",
        SHA,
        tuple("0123456789"),
        1,
        (28, 28),
        1000,
        200,
        (0.5,),
        (0.2,),
        train_origin,
        test_origin,
    )


def test_splits_sizes_digests_and_profiles():
    splits = image_splits(ref(), seed=3, val_fraction=0.1)
    assert [json.loads(split.to_dict()["profile"])["num_rows"] for split in splits.values()] == [
        900,
        100,
        200,
    ]
    assert splits["test"].digest == SHA[:16]
    assert splits["training"].digest.startswith(SHA[:16] + "-")
    assert splits["validation"].digest.startswith(SHA[:16] + "-")
    assert splits["training"].digest != splits["validation"].digest
    # Another split recipe over the same data gets other digests, the test split the same.
    other = image_splits(ref(), seed=4, val_fraction=0.1)
    assert other["training"].digest != splits["training"].digest and other["test"].digest == SHA[:16]
    assert json.loads(splits["training"].to_dict()["profile"]) == {
        "num_rows": 900,
        "num_classes": 10,
        "image_shape": [1, 28, 28],
        "seed": 3,
        "val_fraction": 0.1,
    }


def test_origins_of_each_kind_of_dataset(tmp_path):
    train, test = FashionMnistSource().origins()
    assert train.startswith("http") and train.endswith("train-images-idx3-ubyte.gz") and "t10k" in test
    assert MnistSource(mirror="https://mirror.example/mnist").origins()[0] == (
        "https://mirror.example/mnist/train-images-idx3-ubyte.gz"
    )
    secret = MnistSource(mirror="https://me:pa55@mirror.example/mnist/").origins()[0]
    assert secret == "https://***@mirror.example/mnist/train-images-idx3-ubyte.gz"
    assert SyntheticSource().origins()[0] == "tasks.data.offline_data.make_synthetic"
    assert origin_source("https://x/y.gz").to_dict() == {"url": "https://x/y.gz"}
    assert origin_source("/data/train.csv").to_dict() == {"uri": "/data/train.csv"}
    assert origin_source("tasks.data.offline_data.load_digits").to_dict() == {
        "tags": {"generator": "tasks.data.offline_data.load_digits"}
    }


def test_logged_inputs_carry_contexts_and_survive_a_retry(mlflow_store, tmp_path):
    run_id = tracking.start_run("exp", "r", {})
    dataset = ref(str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))
    for _ in range(2):  # a retried task logs the same inputs again
        log_splits(run_id, dataset, seed=0, val_fraction=0.25)
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    contexts = {entry.tags[0].value: entry.dataset for entry in inputs}
    assert len(inputs) == 3 and set(contexts) == {"training", "validation", "test"}
    assert json.loads(contexts["validation"].profile)["num_rows"] == 250
    assert contexts["test"].source_type == "local"
    assert json.loads(contexts["test"].source) == {"uri": str(tmp_path / "test.csv")}
