import os

import pytest

from common.path_settings import path_marks
from flows.config import PredictConfig, TrainConfig
from flows.confinement import ParameterOutsideRootsError, allowed_roots, check_confined, path_parameters
from flows.sweep_config import SweepConfig
from tasks.data.sources import SOURCES

DEPLOYMENT = "PREFECT__RUNTIME__DEPLOYMENT__ID"  # how Prefect lets a test stand in for a deployment run


@pytest.fixture
def deployment_run(monkeypatch, tmp_path):
    """A deployment run on a worker that allows tmp_path/allowed only; returns that folder."""
    root = tmp_path / "allowed"
    root.mkdir()
    monkeypatch.setenv(DEPLOYMENT, "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("PIC_ALLOWED_ROOTS", str(root))
    return root


def outside_configs(outside: str, weights_file: str) -> dict[str, object]:
    """Parameter (as the error names it) -> a config whose only outside path is that parameter."""
    predict = dict(registered_model="m", data_dir="d", output_dir="o")
    train = dict(data_dir="d", output_dir="o")
    return {
        "output": PredictConfig(**predict, dataset="digits", output=outside),
        "output_dir": PredictConfig(**{**predict, "output_dir": outside}, dataset="digits"),
        "image_dir": PredictConfig(**predict, image_dir=outside),
        "input_csv": PredictConfig(**predict, input_csv=outside),
        "image_root": PredictConfig(**predict, input_csv="in.csv", image_root=outside),
        "data_dir": TrainConfig(**{**train, "data_dir": outside}),
        "dataset.train_csv": TrainConfig(
            **train, dataset="csv", train_csv=outside, test_csv="t", image_root="r"
        ),
        "dataset.test_dir": TrainConfig(**train, dataset="folder", train_dir="t", test_dir=outside),
        "weights": TrainConfig(**train, model="resnet18", weights=weights_file),
        "dataset.mirror": TrainConfig(**train, mirror=f"file://{outside}"),
        "base.dataset.image_root": SweepConfig(
            base=TrainConfig(**train, dataset="csv", train_csv="a", test_csv="b", image_root=outside),
            grid={"lr": [0.1]},
        ),
        "base.output_dir": SweepConfig(
            base=TrainConfig(data_dir="d", output_dir=outside), grid={"lr": [0.1]}
        ),
        "grid.weights": SweepConfig(
            base=TrainConfig(**train, model="resnet18"), grid={"weights": ["none", weights_file]}
        ),
    }


def test_a_deployment_run_refuses_every_path_parameter_outside_the_roots(
    deployment_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(deployment_run)  # the relative paths of the other parameters land inside
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    for name, config in outside_configs("/etc/x", str(weights)).items():
        with pytest.raises(ParameterOutsideRootsError) as refused:
            check_confined(config)
        value = str(weights) if "weights" in name else "/etc/x"
        message = str(refused.value)
        assert message.startswith(f"parameter {name}={value!r} resolves to "), message
        assert str(deployment_run) in message and "PIC_ALLOWED_ROOTS=" in message


def test_the_command_line_takes_any_path(tmp_path, monkeypatch):
    monkeypatch.delenv(DEPLOYMENT, raising=False)
    monkeypatch.chdir(tmp_path)
    config = PredictConfig(registered_model="m", dataset="digits", output="/etc/x", data_dir="/")
    check_confined(config)  # no error: a user's own command line may name any folder
    monkeypatch.setenv(DEPLOYMENT, "00000000-0000-0000-0000-000000000001")
    with pytest.raises(ParameterOutsideRootsError, match="resolves to /"):
        check_confined(config)  # the same paths from a deployment run are refused


def test_a_link_inside_a_root_that_leads_out_is_refused(deployment_run, monkeypatch):
    monkeypatch.chdir(deployment_run)
    (deployment_run / "images").symlink_to("/etc")
    config = PredictConfig(registered_model="m", image_dir="images")
    with pytest.raises(ParameterOutsideRootsError, match="parameter image_dir=.* resolves to /etc,"):
        check_confined(config)


def test_paths_under_a_root_pass_and_the_default_root_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(DEPLOYMENT, "00000000-0000-0000-0000-000000000001")
    monkeypatch.delenv("PIC_ALLOWED_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert allowed_roots() == [tmp_path.resolve()]
    check_confined(PredictConfig(registered_model="m", dataset="digits", output=str(tmp_path / "p.csv")))
    with pytest.raises(ParameterOutsideRootsError, match="parameter data_dir='../data'"):
        check_confined(PredictConfig(registered_model="m", dataset="digits", data_dir="../data"))
    monkeypatch.setenv("PIC_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path.parent)]))
    check_confined(PredictConfig(registered_model="m", dataset="digits", data_dir="../data"))


def test_every_path_field_of_the_configs_and_sources_is_confined():
    # A field added later whose name says "path" must carry the mark, or deployments could point it anywhere.
    for model in (TrainConfig, PredictConfig, *SOURCES):
        for name, field in model.model_fields.items():
            if name == "output" or name.endswith(("_dir", "_csv", "_root", "_path", "_file")):
                assert path_marks(field.metadata), f"{model.__name__}.{name} is not marked as a path"
    config = PredictConfig(registered_model="m", input_csv="a.csv", image_root="r", output="p.csv")
    assert dict(path_parameters(config)) == {
        "data_dir": "data",
        "output_dir": "outputs",
        "output": "p.csv",
        "image_root": "r",
        "input_csv": "a.csv",
    }
    folder = TrainConfig(dataset="folder", train_dir="t", weights="none", mirror=None)
    assert dict(path_parameters(folder)) == {
        "dataset.train_dir": "t",
        "data_dir": "data",
        "output_dir": "outputs",
    }
    web = TrainConfig(mirror="https://mirror.example/mnist/")  # only a file:// mirror names a path
    assert dict(path_parameters(web)) == {"data_dir": "data", "output_dir": "outputs"}


@pytest.mark.slow
def test_a_flow_run_not_from_a_deployment_is_free(prefect_server, monkeypatch, tmp_path):
    from prefect import flow

    monkeypatch.delenv(DEPLOYMENT, raising=False)
    monkeypatch.setenv("PIC_ALLOWED_ROOTS", str(tmp_path))

    @flow
    def checked() -> str:
        check_confined(PredictConfig(registered_model="m", dataset="digits", output="/etc/x"))
        return "passed"

    assert checked() == "passed"  # Prefect's runtime says no deployment: the command line's case
