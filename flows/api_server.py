"""Prefect's temporary API server, started before the program's heavy imports so the two overlap.

Without a configured API, Prefect starts a temporary server at the first flow run: it imports
the server in this process, then starts it in a child and waits for it, about 7 s on 2 cores
after our own imports. `start()` has a small child process do exactly that (Prefect's own
`SubprocessASGIServer`, same database, same settings) while this process is still importing
torch and MLflow, and `use()` points the flow run at it, or at nothing when it did not come up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
from typing import Iterator, Optional

# Runs in the child: starts the server, prints its API URL, keeps it until stdin closes.
_SUPERVISOR = """
import os, sys
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start()
print(server.api_url, flush=True)
sys.stdin.read()
server.stop()
os._exit(0)  # nothing else to tidy, and tearing the imports down would keep the caller waiting
"""
_STARTUP_TIMEOUT_SECONDS = 60


class EarlyServer:
    """A temporary Prefect API server starting in the background."""

    def __init__(self) -> None:
        self.url: Optional[str] = None
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            # See flows/train_flow.py: the server's telemetry heartbeat has nothing to do with runs.
            env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ},
        )
        self._ready = threading.Thread(target=self._read_url, daemon=True)
        self._ready.start()
        atexit.register(self.stop)

    def _read_url(self) -> None:
        line = self.process.stdout.readline().strip()
        self.url = line if line.startswith("http") else None

    def wait(self) -> Optional[str]:
        """The API URL once the server answers, or None if it did not start in time."""
        self._ready.join(_STARTUP_TIMEOUT_SECONDS)
        return self.url

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # the supervisor stops the server and exits
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start() -> Optional[EarlyServer]:
    """Starts the temporary server now when the flow run would need one: no PREFECT_API_URL in
    the environment or the active profile."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import get_current_settings

    return None if get_current_settings().api.url else EarlyServer()


@contextlib.contextmanager
def use(server: Optional[EarlyServer]) -> Iterator[None]:
    """Points this process's flow runs at `server` (if it came up) inside the block."""
    url = server.wait() if server else None
    if url is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        yield
