import builtins
import datetime
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from common.files import OutputWriteError
from tasks.track import steps, tracking

MIRROR = "https://bob:pa55@files.example/mnist/?token=t0ken&v=2"  # a --mirror with credentials
MIRROR_SHOWN = "https://***@files.example/mnist/?token=***&v=***"


def test_run_lifecycle_in_a_real_store(mlflow_store, tmp_path):
    run_id = tracking.start_run("exp", "run-a", {"prefect.flow_run_id": "abc"})
    tracking.log_params(run_id, {"lr": 0.1, "classes": None, "mirror": MIRROR})
    tracking.log_metrics(run_id, {f"m{i}": i for i in range(1200)}, step=2)  # more than one batch
    tracking.log_tags(run_id, {"device": "cpu"})
    (tmp_path / "a.txt").write_text("x")
    tracking.log_artifacts(run_id, [tmp_path / "a.txt"])
    tracking.finish_run(run_id, "FAILED")
    run = MlflowClient().get_run(run_id)
    assert run.data.params == {"lr": "0.1", "classes": "", "mirror": MIRROR_SHOWN}  # no credentials
    assert len(run.data.metrics) == 1200 and run.data.metrics["m7"] == 7
    assert run.data.tags["device"] == "cpu" and run.info.status == "FAILED"
    assert [a.path for a in MlflowClient().list_artifacts(run_id)] == ["a.txt"]
    assert tracking.find_run("exp", "abc") == run_id
    assert tracking.find_run("exp", "other") is None and tracking.find_run("nope", "abc") is None


def test_a_trials_run_is_nested_under_the_sweeps_and_found_again(mlflow_store):
    parent = tracking.start_run("exp", "sweep", {})
    child = tracking.open_child_run(parent, 2, "trial-2", {"device": "cpu"}, {"lr": 0.1})
    assert MlflowClient().get_run(child).data.tags["mlflow.parentRunId"] == parent  # nested in the UI
    assert tracking.find_child_run(parent, 2) == child and tracking.find_child_run(parent, 3) is None
    assert tracking.open_child_run(parent, 2, "trial-2", {}, {"lr": 0.1}) == child  # a retry reopens it


@pytest.mark.slow
def test_git_tags_name_the_commit_or_nothing(tmp_path):
    assert tracking.git_tags(tmp_path) == {}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    tags = tracking.git_tags(tmp_path)
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] == "false"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]  # where MLflow's UI shows it


def test_system_metrics_are_sampled_while_a_block_runs(mlflow_store):
    run_id = tracking.start_run("exp", "r", {})
    with tracking.system_metrics(run_id, interval=0.2):
        time.sleep(0.7)
    client = MlflowClient()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics
    # A retried block goes on from the last step; a disabled one records nothing.
    with tracking.system_metrics(run_id, interval=10):
        pass
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == len(history) + 1
    quiet = tracking.start_run("exp", "quiet", {})
    with tracking.system_metrics(quiet, enabled=False):
        time.sleep(0.3)
    assert client.get_run(quiet).data.metrics == {}


def test_metrics_linked_to_a_logged_model_stay_single_in_the_run(mlflow_store):
    run_id = tracking.start_run("exp", "r", {})
    client = MlflowClient()
    model = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name="m", source_run_id=run_id
    )
    logged_at = tracking.now_ms()
    tracking.log_metrics(run_id, {"test_accuracy": 0.9}, timestamp=logged_at)
    for _ in range(2):
        tracking.log_metrics(run_id, {"test_accuracy": 0.9}, model_id=model.model_id, timestamp=logged_at)
    assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
    assert [(m.key, m.value) for m in client.get_logged_model(model.model_id).metrics] == [
        ("test_accuracy", 0.9)
    ]


# One interpreter pays the imports (mlflow and torch: seconds of CPU each), then forks the openers:
# processes of their own that open the new store at the same moment, as runs started together do.
OPEN_STORE_AT_ONCE = """
import os, sys, time, traceback
from pathlib import Path
from tasks.track import tracking
children = []
for _ in range(int(sys.argv[2])):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            while not Path(sys.argv[1], "go").exists():
                time.sleep(0.001)
            tracking.get_client().search_registered_models()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    children.append(pid)
Path(sys.argv[1], "go").touch()
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print(*codes)
sys.exit(max(codes))
"""


@pytest.mark.slow
def test_processes_opening_a_new_sqlite_store_at_once_take_turns_creating_it(tmp_path, monkeypatch):
    # Unguarded, MLflow's table creation in processes that start together fails in most rounds
    # ("table experiments already exists", "duplicate column name").
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/new.db")
    command = [sys.executable, "-c", OPEN_STORE_AT_ONCE, str(tmp_path), "4"]
    openers = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert openers.stdout.split() == ["0"] * 4, openers.stderr[-3000:]  # each opener's exit status
    assert (tmp_path / ".new.db.create.lock").exists()


def test_links_to_the_mlflow_ui_carry_no_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:pa55@mlflow.example:5000/")
    assert tracking.web_url("models", "m") == "https://mlflow.example:5000/#/models/m"


def test_config_json_is_atomic_and_without_credentials(tmp_path, monkeypatch):
    path = steps.write_config(tmp_path, {"mirror": MIRROR, "lr": 0.1}, "cpu")
    assert json.loads(path.read_text()) == {
        "mirror": MIRROR_SHOWN,
        "lr": 0.1,
        "resolved_device": "cpu",
        "run_dir": str(tmp_path),
    }
    before = path.read_bytes()
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and "config.json" in os.fspath(file) else handle

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(OutputWriteError, match=f"cannot write {path}: .*Errno {errno.ENOSPC}"):
        steps.write_config(tmp_path, {"lr": 0.2}, "cpu")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["config.json"]


class FullDisk:
    """A file on a disk with 10 bytes left: they land, then write() raises ENOSPC, as write(2) does."""

    def __init__(self, handle) -> None:
        self._handle, self._room = handle, 10

    def write(self, data: str) -> int:
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def test_run_folders_stay_inside_output_dir_whatever_the_flow_run_name(tmp_path, monkeypatch):
    output_dir = tmp_path / "outputs"
    started = datetime.datetime(2030, 1, 2, 3, 4, 5)

    def run_dir(name: str) -> Path:
        monkeypatch.setattr(steps, "flow_run", SimpleNamespace(name=name, scheduled_start_time=started))
        return steps.make_run_dir(output_dir)

    assert run_dir("crimson-otter") == output_dir / "20300102-030405-crimson-otter"
    escaping = run_dir("a/../../x")
    assert re.fullmatch(r"20300102-030405-a-\.\.-\.\.-x-[0-9a-f]{8}", escaping.name), escaping.name
    assert escaping.parent == output_dir and escaping.is_dir() and run_dir("a/../../x") == escaping
    assert run_dir("a/../../y") != escaping  # names that slugify alike keep their own folders
    for name in ("../" * 200, "..", "/etc/passwd", "nul\x00l \n" + "é" * 300):
        folder = run_dir(name)
        assert folder.parent == output_dir and len(folder.name) <= 16 + 80, name
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", folder.name), folder.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing escaped
    (output_dir / "20300102-030405-planted").symlink_to(tmp_path)
    with pytest.raises(OutputWriteError, match="20300102-030405-planted: .*leads out of --output-dir"):
        run_dir("planted")
