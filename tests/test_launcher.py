"""The flow scripts' launcher (flows/launcher.py): one parse, one check of each server, the heavy
imports and the MLflow store opened in the main thread only, one-line user errors."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import TRAIN_SCRIPT, script_env

from flows import launcher
from tasks.track import delivery, steps, tracking

# Runs a flow script as `python SCRIPT FLAGS` would, then prints which heavy modules it imported.
IMPORTS_PROBE = """
import runpy, sys
sys.argv = [{script!r}, *{flags!r}]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(sorted(name for name in ("torch", "prefect", "mlflow", "flows.train_flow") if name in sys.modules))
"""

# Runs a flow script as `python SCRIPT FLAGS` would, recording each thread that configures
# SQLAlchemy's mappers (MLflow's SQL stores do as they are imported) and whether a flow run was on.
MAPPERS_PROBE = """
import atexit, json, runpy, sys, threading
import sqlalchemy.orm

calls, configure = [], sqlalchemy.orm.configure_mappers

def recorded():
    from prefect.context import FlowRunContext

    calls.append([threading.current_thread().name, FlowRunContext.get() is not None])
    return configure()

sqlalchemy.orm.configure_mappers = recorded
atexit.register(lambda: open({out!r}, "w").write(json.dumps(calls)))
sys.argv = [{script!r}, *{flags!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def probe(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=script_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_bad_flags_answer_before_any_heavy_import_or_server(tmp_path):
    flags = ["--epochs", "0", "--output-dir", str(tmp_path / "out")]
    result = probe(tmp_path, IMPORTS_PROBE.format(script=str(TRAIN_SCRIPT), flags=flags))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--epochs 0: Input should be greater than or equal to 1" in result.stderr
    assert result.stdout.strip() == "[]"  # no torch, Prefect, MLflow or flow module yet
    assert not (tmp_path / "prefect").exists() and not (tmp_path / "mlflow.db").exists()


def write_flow_module(folder: Path, body: str) -> str:
    """A module with the launcher's `main(config)` and `USER_ERRORS`, importable from `folder`."""
    (folder / "fake_flow.py").write_text(textwrap.dedent(body))
    return "fake_flow"


@pytest.fixture
def no_git(monkeypatch) -> None:
    """Runs opened without asking git for the commit (a process of its own)."""
    monkeypatch.setattr(tracking, "git_tags", dict)


@pytest.fixture
def launch_log(tmp_path, mlflow_store, no_git, monkeypatch) -> Iterator[list[str]]:
    """What the launcher did, in order, with the servers' checks and the server start recorded."""
    log: list[str] = []
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as launch sets it
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_flow", raising=False)
    monkeypatch.setattr(launcher, "exit_unless_tracking_answers", lambda: log.append("tracking"))
    monkeypatch.setattr(launcher, "exit_unless_prefect_answers", lambda: log.append("prefect"))
    monkeypatch.setattr(launcher.api_server, "start", lambda: log.append("server"))
    monkeypatch.setattr(delivery, "check_reachable", lambda: log.append("tracking again"))
    yield log
    gc.unfreeze()  # launch froze this test process's objects, as it does a script's


def test_launch_checks_once_starts_the_server_before_importing_and_opens_the_store_first(
    tmp_path, launch_log, monkeypatch
):
    module = write_flow_module(
        tmp_path,
        """
        import gc
        from pathlib import Path
        from tasks.track import steps
        USER_ERRORS = (LookupError,)
        LOG = [f"imported, collector on: {gc.isenabled()}"]

        def main(config):
            store = Path("mlflow.db").is_file()
            LOG.append(f"main {config}, store made: {store}, collector on: {gc.isenabled()}")
            for attempt in (1, 2):  # the run's open-mlflow-run, then a retry of it
                steps.open_mlflow_run.fn("exp", {}, f"flow-run-{attempt}", "name", "cpu", Path("."))
            return {"ran": config}
        """,
    )
    script = launcher.Script(
        module,
        parse=lambda argv: launch_log.append("parse") or argv[0],
        first=(lambda config: launch_log.append(f"first {config}"),),
        beside=(lambda config: launch_log.append(f"beside {config}"),),
    )
    assert launcher.launch(script, ["x"]) == {"ran": "x"}
    assert launch_log == ["parse", "tracking", "prefect", "first x", "server", "beside x", "tracking again"]
    # The store was opened before the run, by the launcher; the collector was off for the imports.
    assert sys.modules[module].LOG == [
        "imported, collector on: False",
        "main x, store made: True, collector on: True",
    ]
    assert gc.get_freeze_count() > 0  # what the imports made is left out of later collections


def test_a_user_error_exits_with_its_one_line_and_others_propagate(tmp_path, launch_log):
    module = write_flow_module(
        tmp_path,
        """
        USER_ERRORS = (LookupError,)

        def main(config):
            raise {"user": LookupError("no such dataset 'x'"), "bug": RuntimeError("a real bug")}[config]
        """,
    )
    script = launcher.Script(module, parse=lambda argv: argv[0])
    with pytest.raises(SystemExit) as exited:
        launcher.launch(script, ["user"])
    assert exited.value.code == "error: no such dataset 'x'"
    with pytest.raises(RuntimeError, match="a real bug"):
        launcher.launch(script, ["bug"])


NO_FP16 = "precision 'fp16' needs a CUDA device, and this run trains on cpu"


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (launcher.TRAIN, ["--device", "cuda"], "device 'cuda' was requested but is not available here"),
        (launcher.TRAIN, ["--precision", "fp16"], NO_FP16),
        (launcher.SWEEP, ["--precision", "fp16", "--grid", "lr=0.1,0.2"], NO_FP16),
    ],
)
def test_hardware_the_machine_lacks_is_refused_before_any_work(
    script, flags, message, tmp_path, launch_log, monkeypatch
):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        launcher.launch(script, ["--dataset", "synthetic", "--device", "cpu", *flags])
    assert exited.value.code.startswith(f"error: {message}")  # printed; the exit status is 1
    assert launch_log == ["tracking", "prefect", "server"]  # refused while the server starts
    assert [path.name for path in tmp_path.iterdir()] == ["mlflow.db"]  # the fixture's: no data, outputs


def test_a_flow_started_otherwise_checks_its_tracking_server(mlflow_store, no_git, tmp_path, monkeypatch):
    checks = []
    monkeypatch.setattr(delivery, "check_reachable", lambda: checks.append("checked"))
    steps.open_mlflow_run.fn("exp", {}, "flow-run", "name", "cpu", tmp_path)  # as a deployment's run does
    assert checks == ["checked"]


@pytest.mark.slow
def test_a_script_runs_on_its_own_server_with_the_mlflow_store_opened_in_the_main_thread(tmp_path):
    """`python flows/train_flow.py` end to end on the temporary server the launcher starts beside
    its imports (Prefect does not start its own), and without the race that killed a run: MLflow's
    store opened in a thread while the main one imported Prefect configured Prefect's half-defined
    server models ("'WorkQueue' failed to locate")."""
    out = tmp_path / "mappers.json"
    flags = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--no-system-metrics"]
    result = probe(tmp_path, MAPPERS_PROBE.format(out=str(out), script=str(TRAIN_SCRIPT), flags=flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout and "-> champion" in result.stdout
    assert list((tmp_path / "outputs").iterdir()) and (tmp_path / "data" / "prepared").is_dir()
    assert "Starting temporary server" not in result.stderr
    calls = json.loads(out.read_text())
    assert calls and all(call == ["MainThread", False] for call in calls), calls
