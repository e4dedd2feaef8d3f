import jsonschema
import pytest
import yaml
from conftest import REPO

from flows.config import PredictConfig, TrainConfig
from flows.source_settings import flatten, lift, settings_owners, source_classes
from flows.sweep_config import SweepConfig
from tasks.data.sources import (
    MEMORY_SOURCES,
    SOURCES,
    CsvSource,
    FashionMnistSource,
    FolderSource,
    MnistSource,
)

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def test_flat_settings_go_under_the_source_and_come_back_out():
    flat = {
        "dataset": "csv",
        "train_csv": "a",
        "test_csv": "b",
        "image_root": "r",
        "mirror": None,
        "epochs": 2,
    }
    nested = lift(flat, "dataset", SOURCES, None)
    assert nested == {
        "dataset": {"name": "csv", "train_csv": "a", "test_csv": "b", "image_root": "r"},
        "epochs": 2,
    }
    assert lift(nested, "dataset", SOURCES, None) == nested  # nested already: as it is
    assert flatten(nested, "dataset") == {
        "dataset": "csv",
        "train_csv": "a",
        "test_csv": "b",
        "image_root": "r",
        "epochs": 2,
    }
    assert lift({"mirror": "https://m/"}, "dataset", SOURCES, FashionMnistSource()) == {
        "dataset": {"name": "fashion-mnist", "mirror": "https://m/"}
    }


def test_another_sources_settings_are_refused_unless_left_at_their_defaults():
    with pytest.raises(
        ValueError,
        match=r"^--train-dir, --test-dir, --test-fraction apply only to --dataset folder, not 'csv'$",
    ):
        lift({"dataset": "csv", "test_fraction": 0.5}, "dataset", SOURCES, None)
    assert lift(
        {"dataset": "csv", "test_fraction": 0.2, "train_csv": "a", "test_csv": "b", "image_root": "r"},
        "dataset",
        SOURCES,
        None,
    )
    with pytest.raises(ValueError, match=r"^dataset 'csv' needs --test-csv, --image-root$"):
        lift({"dataset": "csv", "train_csv": "a", "test_csv": ""}, "dataset", SOURCES, None)


def test_which_fields_hold_sources_and_whose_settings_are_whose():
    assert source_classes(TrainConfig.model_fields["dataset"].annotation) == SOURCES
    assert source_classes(PredictConfig.model_fields["dataset"].annotation) == MEMORY_SOURCES
    assert source_classes(TrainConfig.model_fields["epochs"].annotation) == ()
    owners = settings_owners(SOURCES)
    assert owners["max_image_pixels"] == [CsvSource, FolderSource] and MnistSource in owners["mirror"]


def test_no_setting_of_a_source_shares_a_name_with_a_configs_own_field():
    # the flat form puts them side by side: a shared name could not say whose it is
    for config, field in ((TrainConfig, "dataset"), (PredictConfig, "dataset")):
        settings = settings_owners(source_classes(config.model_fields[field].annotation))
        assert not set(settings) & set(config.model_fields), config.__name__


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_prefect_yaml_parameters_pass_the_schema_the_server_checks(deployment):
    config_class = {"train": TrainConfig, "sweep": SweepConfig, "predict": PredictConfig}[
        deployment["entrypoint"].split("/")[1].split("_")[0]
    ]
    config = deployment["parameters"]["config"]
    jsonschema.validate(config, config_class.model_json_schema())
    config_class.model_validate(config)
    nested = {"dataset": {"name": "folder", "train_dir": "photos"}}  # the Prefect UI's form of a source
    jsonschema.validate(nested, TrainConfig.model_json_schema())
