"""The early temporary Prefect server (flows/api_server.py), as flows/launcher.py uses it:
each test runs a small program in its own process, with its own PREFECT_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, script_env

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the early server hands over a POSIX socket")


def run_program(cwd: Path, body: str, env: dict | None = None) -> subprocess.CompletedProcess:
    program = f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", program],
        cwd=cwd,
        env=env or script_env(cwd, seeded=True),
        capture_output=True,
        text=True,
        timeout=180,
    )


def gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_flow_runs_on_the_early_server_which_stops_with_the_program(tmp_path):
    result = run_program(
        tmp_path,
        """
        from flows import api_server
        server = api_server.start()
        print("pid", server.process.pid)
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        @flow
        def hello():
            return 1

        import os
        from tasks.publish.gate_lock import TEMPORARY_API_VARIABLE

        with api_server.use(server):
            assert PREFECT_API_URL.value() == server.url, (PREFECT_API_URL.value(), server.url)
            # Marked temporary, for the champion gate here and in child processes.
            assert os.environ[TEMPORARY_API_VARIABLE] == server.url
            hello()
            with get_client(sync_client=True) as client:
                print("flow runs", [run.state.name for run in client.read_flow_runs()])
        assert TEMPORARY_API_VARIABLE not in os.environ
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    lines = dict(line.split(" ", 1) for line in printed if line.startswith(("pid", "flow")))
    assert lines["flow"] == "runs ['Completed']"
    assert gone(int(lines["pid"]), within=1)  # stopped at exit, not left to the OS


@pytest.mark.slow
def test_server_goes_with_its_program_even_on_sigkill(tmp_path):
    result = run_program(
        tmp_path,
        """
        import os, signal
        from flows import api_server
        server = api_server.start()
        print(server.process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert result.returncode == -9
    assert gone(int(result.stdout.split()[0]))


@pytest.mark.slow
def test_no_early_server_when_an_api_is_configured(tmp_path):
    check = """
        from flows import api_server
        print(api_server.start())
        """
    env = {**script_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    assert run_program(tmp_path, check, env).stdout.strip() == "None"
    # The same URL in the active profile: the server started meanwhile is stopped at once.
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    result = run_program(
        tmp_path,
        """
        from flows import api_server
        made, init = [], api_server.EarlyServer.__init__
        api_server.EarlyServer.__init__ = lambda self: (init(self), made.append(self))[0]
        print(api_server.start(), [server.process.poll() is not None for server in made])
        """,
    )
    assert result.stdout.strip() == "None [True]", result.stderr[-3000:]
