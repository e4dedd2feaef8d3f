"""Prefect's temporary API server, started before the program's heavy imports so the two overlap.

Without a configured API, Prefect starts a temporary server at the first flow run: it imports
the server in this process, then starts it in a child and waits for it, about 7 s on 2 cores
after our own imports. `start()` launches the same child as Prefect's `SubprocessASGIServer`
(uvicorn serving `prefect.server.api.server:create_app`, UI off, same settings and database)
at once, on a socket bound here, so it comes up while this process is still importing torch and
MLflow; `use()` points the flow run at it, or at nothing (Prefect's own) when it did not come up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, Optional

from common import compat

_STARTUP_TIMEOUT_SECONDS = 60
_STOP_TIMEOUT_SECONDS = 5


class EarlyServer:
    """A temporary Prefect API server starting in the background."""

    def __init__(self) -> None:
        # Bound here and handed over, so the port is known now and no other process can take it.
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
        with listener:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app"]
                + ["--fd", str(listener.fileno()), "--log-level", "error", "--lifespan", "on"],
                pass_fds=(listener.fileno(),),
                preexec_fn=_exit_with_parent(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={
                    **os.environ,  # it reads the profile and settings files as this process does
                    # What Prefect sets for its own temporary server: no UI, no background services.
                    "PREFECT_UI_ENABLED": "0",
                    **compat.temporary_server_env(),
                    # See flows/launcher.py: the server's telemetry heartbeat has nothing to do with runs.
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                },
            )
        atexit.register(self.stop)

    def wait(self) -> Optional[str]:
        """The API URL once the server answers, or None if it exited or did not answer in time."""
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:  # not listening yet
                pass
            time.sleep(0.05)
        self.stop()
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _exit_with_parent():
    """On Linux, a hook that has the child sent SIGTERM when this process dies, even by SIGKILL,
    so no server outlives its run."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start() -> Optional[EarlyServer]:
    """Starts the temporary server now when the flow run would need one: no PREFECT_API_URL in
    the environment or the active profile (and a POSIX system, which can hand a socket over)."""
    if os.environ.get("PREFECT_API_URL") or os.name != "posix":
        return None
    server = EarlyServer()  # before importing Prefect's settings (~1 s), which it reads itself
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:  # set in the profile after all
        server.stop()
        return None
    return server


@contextlib.contextmanager
def use(server: Optional[EarlyServer]) -> Iterator[None]:
    """Points this process's flow runs at `server` (if it came up) inside the block, and marks its
    URL as temporary for the champion gate (and for child processes) in the environment."""
    url = server.wait() if server else None
    if url is None and server and server.process.returncode >= 0:  # it failed, not stopped for time
        # Runs started at once on a new PREFECT_HOME race to fill its database as their servers
        # start ("UNIQUE constraint failed: block_type.slug"); the loser's second server finds it full.
        url = EarlyServer().wait()
    if url is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.publish.gate_lock import TEMPORARY_API_VARIABLE

    before = os.environ.get(TEMPORARY_API_VARIABLE)
    os.environ[TEMPORARY_API_VARIABLE] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop(TEMPORARY_API_VARIABLE, None)
        else:
            os.environ[TEMPORARY_API_VARIABLE] = before
