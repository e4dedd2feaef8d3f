"""`-m "not slow"` starts no process: tests/conftest.py refuses any start in a quick test, loudly."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from types import SimpleNamespace

import pytest
from conftest import ProcessGuard, require_slow_marks

QUICK = "tests/test_x.py::test_quick"


def test_every_way_of_starting_a_process_fails_naming_the_test_and_the_command():
    guard = ProcessGuard(QUICK)
    with pytest.MonkeyPatch.context() as patch:
        guard.install(patch)
        with pytest.raises(
            AssertionError, match=f"^test {QUICK} is not marked slow but starts a process: git st"
        ):
            subprocess.run(["git", "status"], capture_output=True)
        with pytest.raises(AssertionError, match="starts a process: echo hi$"):
            subprocess.Popen("echo hi", shell=True)
        with pytest.raises(AssertionError, match="starts a process: os.fork"):
            multiprocessing.get_context("fork").Process(target=print).start()
        with pytest.raises(AssertionError, match="starts a process: fork_exec"):
            multiprocessing.get_context("spawn").Process(target=print).start()
        with pytest.raises(AssertionError, match="starts a process: os.system"):
            os.system("true")
        with pytest.raises(AssertionError, match="starts a process: os.posix_spawn"):
            os.posix_spawn("/bin/true", ["true"], {})
    assert len(guard.started) == 6  # kept, to fail the test even if the code under test caught it


def item(name: str, fixtures: list[str], slow: bool) -> SimpleNamespace:
    return SimpleNamespace(
        nodeid=f"tests/test_x.py::{name}",
        fixturenames=fixtures,
        get_closest_marker=lambda mark: object() if slow and mark == "slow" else None,
    )


def test_a_test_using_a_server_fixture_must_be_marked_slow():
    require_slow_marks(
        [item("test_flow", ["prefect_server", "tmp_path"], slow=True), item("test_unit", [], False)]
    )
    with pytest.raises(
        pytest.UsageError, match=r"tests/test_x.py::test_cluster \(uses dask_cluster\)"
    ) as refused:
        require_slow_marks(
            [item("test_cluster", ["dask_cluster"], False), item("test_ok", ["tmp_path"], False)]
        )
    assert "test_ok" not in str(refused.value)
