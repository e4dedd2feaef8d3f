import time

import pytest
from pydantic import ValidationError

from flows import sweep_config
from flows.config import TrainConfig
from flows.sweep_config import (
    OversubscribedError,
    SearchRange,
    SweepConfig,
    check_machine_fits,
    parse_sweep_config,
)
from tasks.data.sources import DigitsSource, FolderSource


def test_flags_set_the_base_and_the_grid():
    config = parse_sweep_config(
        ["--dataset", "digits", "--epochs", "2", "--grid", "lr=0.001,0.003", "--grid", "model=mlp,cnn"]
    )
    assert config.base.dataset == DigitsSource() and config.base.epochs == 2
    assert config.swept_fields == ["lr", "model"] and config.task_runner == "threads"
    trials = config.trial_configs()
    assert [(t.lr, t.model, t.epochs) for t in trials] == [
        (0.001, "mlp", 2),
        (0.001, "cnn", 2),
        (0.003, "mlp", 2),
        (0.003, "cnn", 2),
    ]
    assert all(isinstance(t, TrainConfig) for t in trials)


def test_trials_keep_the_bases_source_and_its_settings():
    flags = [
        "--dataset",
        "folder",
        "--train-dir",
        "photos",
        "--test-fraction",
        "0.3",
        "--grid",
        "image_size=32,64",
    ]
    config = parse_sweep_config(flags)
    source = FolderSource(train_dir="photos", test_fraction=0.3)
    assert [(t.dataset, t.image_size) for t in config.trial_configs()] == [(source, "32"), (source, "64")]


def test_random_search_flags():
    config = parse_sweep_config(
        [
            "--random",
            "5",
            "--space",
            "lr=1e-4:1e-2:log",
            "--space",
            "batch-size=16:128",
            "--max-parallel",
            "2",
        ]
    )
    assert config.space == {
        "lr": SearchRange(low=1e-4, high=1e-2, log=True),
        "batch_size": SearchRange(low=16, high=128),
    }
    trials = config.trial_configs()
    assert len(trials) == 5 and len({t.lr for t in trials}) == 5
    assert all(1e-4 <= t.lr <= 1e-2 and 16 <= t.batch_size <= 128 for t in trials)
    assert trials == config.trial_configs()  # seeded by --seed
    assert config.max_parallel == 2


def test_cluster_flags():
    config = parse_sweep_config(
        ["--grid", "seed=0,1", "--task-runner", "dask", "--address", "tcp://10.0.0.5:8786"]
    )
    assert (config.task_runner, config.address) == ("dask", "tcp://10.0.0.5:8786")
    assert (
        parse_sweep_config(["--grid", "seed=0,1", "--task-runner", "ray", "--address", "auto"]).address
        == "auto"
    )


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--grid", "lr=0.1,-1"], "--grid lr=-1: Input should be greater than 0"),
        (["--grid", "lrr=0.1"], "--grid lrr: not a setting a trial can vary"),
        (
            ["--grid", "dataset=mnist"],
            "--grid dataset: not a setting a trial can vary; choose from model (mlp|cnn|resnet18|resnet50|",
        ),
        (["--grid", "model=mlp,rnn"], "--grid model=rnn: Input should be 'mlp', 'cnn', 'resnet18'"),
        (["--grid", "image-size=64,0"], "--grid image_size=0: String should match pattern"),
        (["--grid", "augment=flip,rotate"], "--grid augment=rotate: Input should be 'auto', 'none'"),
        (
            ["--grid", "weights=imagenet"],
            "--grid weights=imagenet: --weights and --freeze-backbone apply only",
        ),
        (["--grid", "lr"], "--grid 'lr': expected FIELD=VALUE"),
        (["--random", "3"], "--random N and --space go together"),
        (["--random", "3", "--space", "lr=1:x"], "--space lr=1:x: expected LOW:HIGH or LOW:HIGH:log"),
        (["--random", "3", "--space", "lr=0:1:log"], "a log range needs LOW > 0"),
        (["--random", "3", "--space", "lr=0.1:0.01"], "LOW must be below HIGH"),
        (
            ["--random", "3", "--space", "epochs=0:4"],
            "--space epochs=0:4: Input should be greater than or equal to 1",
        ),
        (["--random", "3", "--space", "model=0:1"], "model is not numeric; sweep it with --grid"),
        (["--grid", "lr=0.1", "--random", "2", "--space", "lr=0.1:0.2"], "given to both --grid and --space"),
        ([], "nothing to sweep"),
        (["--grid", "seed=1", "--epochs", "0"], "--epochs 0"),
        (
            ["--grid", "seed=1", "--address", "tcp://h:1"],
            "--address applies only to --task-runner dask or ray",
        ),
        (["--grid", "seed=1", "--task-runner", "dask", "--address", "ray://h:1"], "takes tcp://HOST:PORT"),
        (["--grid", "seed=1", "--max-parallel", "0"], "--max-parallel 0"),
        (
            ["--grid", "seed=" + ",".join(map(str, range(1001)))],
            "1001 trials (--grid seed (1001 values)); a sweep runs at most 1000",
        ),
        (
            ["--grid", "lr=0.1,0.2", "--random", "501", "--space", "epochs=1:3"],
            "1002 trials (--grid lr (2 values) x --random 501); a sweep runs at most 1000",
        ),
        (
            ["--random", "1001", "--space", "lr=0.1:0.2"],
            "--random 1001: Input should be less than or equal to 1000",
        ),
    ],
)
def test_bad_sweeps_exit_2_naming_the_value(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_sweep_config(flags)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_huge_grids_are_refused_from_their_sizes_before_anything_is_built(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a trial or value was built before the count was checked")

    monkeypatch.setattr(TrainConfig, "model_validate", build)  # each grid value's check
    grid = {"lr": [0.1] * 1000, "seed": list(range(1000)), "batch_size": [32] * 1000}
    started = time.monotonic()
    with pytest.raises(ValidationError) as raised:
        SweepConfig(grid=grid)
    message = str(raised.value)
    assert (
        "1000000000 trials (--grid lr (1000 values) x --grid seed (1000 values) x --grid batch_size"
        in message
    )
    assert "a sweep runs at most 1000" in message
    assert time.monotonic() - started < 2


def test_the_prefect_form_takes_the_same_config_as_json():
    config = SweepConfig.model_validate(
        {"base": {"dataset": "digits"}, "grid": {"lr": [0.001, 0.01]}, "task_runner": "processes"}
    )
    assert [t.lr for t in config.trial_configs()] == [0.001, 0.01]
    assert {t.dataset for t in config.trial_configs()} == {DigitsSource()}
    assert "grid" in SweepConfig.model_json_schema()["properties"]


def test_trials_that_would_oversubscribe_this_machine_are_refused_naming_runner_and_devices(monkeypatch):
    monkeypatch.setattr(sweep_config, "capacity", lambda device: (4, "CPUs"))
    monkeypatch.setattr(sweep_config.os, "cpu_count", lambda: 4)
    flags = ["--dataset", "digits", "--devices", "2", "--grid", "lr=0.1,0.2,0.3"]
    with pytest.raises(OversubscribedError, match=r"threads runs 3 trials at once.*--devices 2.*6 training"):
        check_machine_fits(parse_sweep_config(flags))
    check_machine_fits(parse_sweep_config([*flags, "--max-parallel", "2"]))  # 2 x 2 fits 4 CPUs
    check_machine_fits(parse_sweep_config([*flags, "--task-runner", "dask", "--address", "tcp://h:1"]))
    with pytest.raises(ValidationError, match="--train-on ray trains one model on a cluster"):
        SweepConfig(base=TrainConfig(train_on="ray"), grid={"lr": [0.1]})
