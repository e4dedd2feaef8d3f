import base64
import time

import pytest
from conftest import TRAIN_SCRIPT, free_port, raw_server, run_train_script
from pydantic import ValidationError

from flows.cli import build_parser, exit_unless_prefect_answers, parse_config
from flows.config import PredictConfig, TrainConfig


def test_flags_fill_a_frozen_config():
    config = parse_config(["--dataset", "digits", "--epochs", "3", "--lr", "0.01", "--model", "mlp"])
    assert (config.dataset, config.epochs, config.lr, config.model) == ("digits", 3, 0.01, "mlp")
    assert config.model_name == "digits-mlp"
    with pytest.raises(ValidationError, match="Instance is frozen"):
        config.epochs = 4


def test_boolean_fields_are_on_off_flags():
    assert parse_config([]).system_metrics is True
    assert parse_config(["--no-system-metrics"]).system_metrics is False
    assert "--system-metrics, --no-system-metrics" in build_parser(TrainConfig, "train").format_help()


def test_every_field_is_a_flag_with_help_and_default():
    text = build_parser(TrainConfig, "train").format_help()
    for name, field in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert field.description.split()[0] in text
    assert "(default: fashion-mnist)" in text and "(default: 5)" in text


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
    assert config.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--lr", "-1"], "--lr -1"),
        (["--dataset", "nope"], "'nope'"),
        (["--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["--batch-size", "many"], "--batch-size many"),
        (["--dataset", "csv"], "--train-csv, --test-csv, --image-root"),
        (["--dataset", "digits", "--train-csv", "x.csv"], "only to --dataset csv"),
        (["--mirror", "ftp://example"], "--mirror ftp://example"),
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


def test_dataset_options_resolve_csv_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(
        ["--dataset", "csv", "--train-csv", "a.csv", "--test-csv", "b.csv", "--image-root", "img"]
    )
    assert config.dataset_options() == {
        "mirror": None,
        "classes": None,
        "train_csv": tmp_path / "a.csv",
        "test_csv": tmp_path / "b.csv",
        "image_root": tmp_path / "img",
        "max_image_pixels": 50_000_000,
    }
    assert "max_image_pixels" not in parse_config(["--dataset", "digits"]).dataset_options()


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


def test_input_options_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(
        ["--registered-model", "m", "--input-csv", "a.csv", "--image-root", "img"], PredictConfig
    )
    assert config.input_options() == {
        "input_csv": tmp_path / "a.csv",
        "image_root": tmp_path / "img",
        "image_dir": None,
        "dataset": None,
        "data_dir": tmp_path / "data",
        "mirror": None,
        "max_image_pixels": 50_000_000,
        "resize": True,
    }


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


def prefect_login_server(handler) -> None:
    """Prefect's API with PREFECT_SERVER_API_AUTH_STRING=admin:right: 401 without it."""
    right = "Basic " + base64.b64encode(b"admin:right").decode()
    handler.send_response(200 if handler.headers.get("Authorization") == right else 401)
    handler.send_header("Content-Length", "3")
    handler.end_headers()
    handler.wfile.write(b'"3"')


@pytest.mark.parametrize("auth", ["admin:right", "admin:wr0ng", None])
def test_a_prefect_server_that_refuses_the_auth_string_is_named_at_once(monkeypatch, capsys, auth):
    with raw_server(prefect_login_server) as url:
        monkeypatch.setenv("PREFECT_API_URL", f"{url}/api")
        if auth:
            monkeypatch.setenv("PREFECT_API_AUTH_STRING", auth)
        else:
            monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        if auth == "admin:right":
            exit_unless_prefect_answers(within=2)
            return
        with pytest.raises(SystemExit) as refused:
            exit_unless_prefect_answers(within=2)
    given = "PREFECT_API_AUTH_STRING" if auth else "a client without PREFECT_API_AUTH_STRING"
    assert refused.value.code == f"error: the Prefect server {url}/api refused {given} (HTTP 401)"


def test_a_prefect_server_that_does_not_answer_is_named_within_the_bound(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    started = time.monotonic()
    with pytest.raises(
        SystemExit, match=f"the Prefect server {url} .PREFECT_API_URL. did not answer within 1 s"
    ):
        exit_unless_prefect_answers(within=1)
    assert time.monotonic() - started < 5
