import time

import pytest
from conftest import TRAIN_SCRIPT, run_train_script
from pydantic import ValidationError

from flows.cli import build_parser, flag_fields, parse_config
from flows.config import PredictConfig, TrainConfig
from tasks.data.images import DEFAULT_MAX_PIXELS
from tasks.data.sources import CsvSource, DigitsSource, FashionMnistSource, FolderSource


def test_flags_fill_a_frozen_config():
    config = parse_config(["--dataset", "digits", "--epochs", "3", "--lr", "0.01", "--model", "mlp"])
    assert (config.dataset, config.epochs, config.lr, config.model) == (DigitsSource(), 3, 0.01, "mlp")
    assert config.model_name == "digits-mlp"
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.epochs = 4


def test_boolean_fields_are_on_off_flags():
    assert parse_config([]).system_metrics is True
    assert parse_config(["--no-system-metrics"]).system_metrics is False
    assert "--system-metrics, --no-system-metrics" in build_parser(TrainConfig, "train").format_help()


def test_every_field_and_every_sources_setting_is_a_flag_with_help_and_default():
    text = " ".join(build_parser(TrainConfig, "train").format_help().split())
    for name, (path, model) in flag_fields(TrainConfig).items():
        assert "--" + name.replace("_", "-") in text
        assert model.model_fields[name].description.split()[0] in text
    assert "(default: fashion-mnist)" in text and "(default: 5)" in text
    assert "--train-csv TRAIN_CSV csv dataset: CSV of training images" in text
    assert "--max-image-pixels MAX_IMAGE_PIXELS csv and folder datasets: Refuse" in text
    assert f"(default: {DEFAULT_MAX_PIXELS})" in text and "(default: 0.2)" in text
    assert flag_fields(TrainConfig)["train_dir"] == ("dataset.train_dir", FolderSource)


def test_csv_classes_flag_is_comma_separated(tmp_path):
    config = parse_config(
        [
            "--dataset",
            "csv",
            "--train-csv",
            "a.csv",
            "--test-csv",
            "b.csv",
            "--image-root",
            str(tmp_path),
            "--classes",
            "cat, dog",
        ]
    )
    assert config.dataset.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--lr", "-1"], "--lr -1"),
        (["--dataset", "nope"], "'nope'"),
        (["--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["--batch-size", "many"], "--batch-size many"),
        (["--dataset", "csv"], "dataset 'csv' needs --train-csv, --test-csv, --image-root"),
        (
            ["--dataset", "digits", "--train-csv", "x.csv"],
            "--train-csv, --test-csv, --image-root, --classes apply only to --dataset csv, not 'digits'",
        ),
        (["--dataset", "csv", "--train-dir", "t"], "--train-dir, --test-dir, --test-fraction apply only"),
        (
            ["--dataset", "digits", "--mirror", "https://m/"],
            "--mirror applies only to --dataset fashion-mnist",
        ),
        (["--dataset", "digits", "--max-image-pixels", "9"], "applies only to --dataset csv or folder"),
        (["--mirror", "ftp://example"], "--mirror ftp://example"),
        (["--dataset", "folder", "--train-dir", "t", "--test-fraction", "2"], "--test-fraction 2"),
        (["--dataset", "folder", "--train-dir", "t", "--max-image-pixels", "0"], "--max-image-pixels 0"),
    ],
)
def test_invalid_flags_exit_2_naming_the_value(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(flags)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.slow
def test_script_rejects_bad_flags_before_any_work(tmp_path):
    started = time.monotonic()
    result = run_train_script(tmp_path, "--epochs", "0", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--epochs 0" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_script_help_lists_flags(tmp_path):
    result = run_train_script(tmp_path, "--help")
    assert result.returncode == 0
    for flag in ("--dataset", "--data-dir", "--train-csv", "--registered-model", "--output-dir", "--device"):
        assert flag in result.stdout


def test_a_sources_settings_keep_its_paths_as_given_and_its_defaults(tmp_path):
    config = parse_config(
        ["--dataset", "csv", "--train-csv", "a.csv", "--test-csv", "b.csv", "--image-root", "img"]
    )
    assert config.dataset == CsvSource(train_csv="a.csv", test_csv="b.csv", image_root="img")
    assert config.dataset.max_image_pixels == DEFAULT_MAX_PIXELS  # resolved where they are read
    folder = parse_config(["--dataset", "folder", "--train-dir", str(tmp_path), "--test-fraction", "0.3"])
    assert folder.dataset == FolderSource(train_dir=str(tmp_path), test_fraction=0.3)
    assert parse_config([]).dataset == FashionMnistSource()
    assert parse_config(["--mirror", "file:///srv/mnist/"]).dataset.mirror == "file:///srv/mnist/"


def test_params_are_flat_and_read_back_the_deployment_forms_too():
    config = parse_config(
        ["--dataset", "csv", "--train-csv", "a.csv", "--test-csv", "b.csv", "--image-root", "r"]
    )
    params = config.model_dump()
    assert params["dataset"] == "csv" and params["train_csv"] == "a.csv" and "test_fraction" not in params
    assert list(params)[:3] == ["dataset", "max_image_pixels", "train_csv"]  # the name, then its settings
    assert TrainConfig(**params) == config == TrainConfig.model_validate_json(config.model_dump_json())
    assert config.model_name == "csv-cnn"
    assert TrainConfig(**{"dataset": "digits", "epochs": 3}).dataset == DigitsSource()  # prefect.yaml
    nested = {"dataset": {"name": "folder", "train_dir": "t"}, "epochs": 3}  # the Prefect UI's form
    assert TrainConfig(**nested).dataset == FolderSource(train_dir="t")
    with pytest.raises(ValidationError, match="dataset 'folder' needs --train-dir"):
        TrainConfig(dataset={"name": "folder"})
    # a saved form of the flat fields with their defaults, for a dataset that has none of them
    assert TrainConfig(dataset="digits", test_fraction=0.2, max_image_pixels=DEFAULT_MAX_PIXELS, mirror=None)


def test_predict_flags_need_a_model_and_exactly_one_input(capsys):
    config = parse_config(["--registered-model", "m", "--image-dir", "imgs"], PredictConfig)
    assert (config.alias, config.flavor, config.registry_name) == ("champion", "onnx", "m-onnx")
    pinned = parse_config(["--registered-model", "m", "--image-dir", "i", "--version", "3"], PredictConfig)
    assert (pinned.version, pinned.alias) == ("3", "champion")
    for flags, named in [
        (["--image-dir", "imgs"], "--registered-model"),
        (["--registered-model", "m"], "exactly one of --input-csv, --image-dir, --dataset"),
        (["--registered-model", "m", "--image-dir", "a", "--dataset", "digits"], "exactly one"),
        (["--registered-model", "m", "--dataset", "csv"], "invalid choice: 'csv'"),
        (["--registered-model", "m", "--image-dir", "a", "--image-root", "b"], "--image-root applies only"),
        (["--registered-model", "m", "--image-dir", "a", "--alias", "x", "--version", "2"], "not both"),
        (["--registered-model", "m", "--image-dir", "a", "--version", "0"], "--version"),
        (["--registered-model", "m", "--image-dir", "a", "--trigger-event", "x; rm"], "--trigger-event"),
    ]:
        with pytest.raises(SystemExit):
            parse_config(flags, PredictConfig)
        assert named in capsys.readouterr().err


@pytest.mark.slow
def test_predict_script_help(tmp_path):
    result = run_train_script(tmp_path, "--help", script=TRAIN_SCRIPT.parent / "predict_flow.py")
    assert result.returncode == 0 and "--registered-model" in result.stdout and "--flavor" in result.stdout


def test_prediction_takes_a_datasets_test_split_with_its_settings():
    flags = ["--registered-model", "m", "--dataset", "fashion-mnist", "--mirror", "https://mirror.example/"]
    config = parse_config(flags, PredictConfig)
    assert config.dataset == FashionMnistSource(mirror="https://mirror.example/")
    assert (
        config.model_dump()["dataset"] == "fashion-mnist" and PredictConfig(**config.model_dump()) == config
    )
    assert PredictConfig(registered_model="m", dataset="digits").dataset == DigitsSource()  # prefect.yaml
    only = "--mirror applies only to --dataset fashion-mnist or mnist \\["  # no ", not ...": no dataset
    with pytest.raises(ValidationError, match=only):
        PredictConfig(registered_model="m", image_dir="i", mirror="https://mirror.example/")
    assert PredictConfig(registered_model="m", image_dir="i").model_dump()["dataset"] is None


def test_a_registered_name_may_not_be_an_onnx_flavors_name():
    # "x-onnx" would register its PyTorch versions in x's ONNX line (and its ONNX ones in "x-onnx-onnx").
    for make in (
        lambda name: TrainConfig(registered_model=name),
        lambda name: PredictConfig(registered_model=name, dataset="digits"),
    ):
        with pytest.raises(
            ValueError, match="'digits-cnn-onnx' ends in '-onnx', which names the ONNX flavor of 'digits-cnn'"
        ):
            make("digits-cnn-onnx")
        assert make("digits-onnxish").registered_model == "digits-onnxish"
