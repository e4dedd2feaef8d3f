"""The team stack on this machine without Docker: PostgreSQL, moto's S3 server (unless S3_ENDPOINT_URL
names a store), MLflow and Prefect, started from installed binaries, with their PostgreSQL data,
logs and pid files in a state folder. deploy/stack.py is its command line.

From Python: `with Stack(state_dir, overrides) as stack: stack.client_env()`; everything it started
is stopped when the block ends, however it ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

import stack_processes as processes
import stack_provision as provision
import stack_settings as config
from stack_processes import Pidfile, Postgres, StackError

SERVERS = ("s3", "mlflow", "prefect")  # stopped in reverse, PostgreSQL last
# Installed packages whose version should match the one settings.env pins for compose's images:
# the servers' database schemas follow them. moto and boto3 are not compared: the script uses
# what `pip install -e '.[deploy]'` gives.
PACKAGES = {"mlflow": "MLFLOW_VERSION", "prefect": "PREFECT_VERSION"}


class Stack:
    """The no-Docker stack whose PostgreSQL data, logs and pid files live in `state_dir`."""

    def __init__(
        self,
        state_dir: Optional[Path] = None,
        overrides: Optional[Mapping[str, object]] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.settings = config.load_settings(overrides, environ)
        # --state-dir is relative to the working folder; STATE_DIR to deploy/.
        self.state = (
            Path(state_dir).resolve() if state_dir else (config.HERE / self.settings["STATE_DIR"]).resolve()
        )
        self.postgres = Postgres(
            self.settings["POSTGRES_VERSION"], self.state / "postgres", self._log("postgres")
        )
        self.children: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "Stack":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def mlflow_url(self) -> str:
        return config.mlflow_url(self.settings)

    @property
    def prefect_api_url(self) -> str:
        return config.prefect_api_url(self.settings)

    def client_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI/USERNAME/PASSWORD, PREFECT_API_URL/AUTH_STRING: no S3 credentials."""
        return config.client_env(self.settings)

    def server_s3(self) -> dict[str, str]:
        """Endpoint, credentials, region and bucket of the S3 store, as the MLflow server uses them."""
        return config.server_s3(self.settings)

    def _log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _pidfile(self, name: str) -> Pidfile:
        return Pidfile(self.state / "run" / f"{name}.pid")

    def _tail(self, name: str) -> str:
        return config.redact(processes.tail(self._log(name)), self.settings)

    def running(self) -> dict[str, int]:
        """Name and PID of each process of this stack that runs now (workers included)."""
        found = {
            path.stem: Pidfile(path).running_pid() for path in sorted((self.state / "run").glob("*.pid"))
        }
        found["postgres"] = self.postgres.pid()
        return {name: pid for name, pid in found.items() if pid is not None}

    def up(self, seconds: float = 180) -> None:
        """Starts every service and waits until each answers; on failure stops what it started."""
        if self.running():
            raise StackError(
                f"the stack in {self.state} already runs {sorted(self.running())}: run down first"
            )
        try:
            self._start_all(seconds)
        except BaseException:
            self.down()
            raise

    def _start_all(self, seconds: float) -> None:
        """Starts each service as soon as what it needs answers: MLflow is the long pole."""
        settings, own_s3 = self.settings, not self.settings["S3_ENDPOINT_URL"]
        self._warn_versions()
        if own_s3:
            self._start("s3", *config.s3_server(settings))
        self.postgres.init(settings["POSTGRES_USER"], settings["POSTGRES_PASSWORD"])
        self.postgres.start(settings["POSTGRES_HOST"], settings["POSTGRES_PORT"], self.state / "socket")
        provision.retrying(lambda: provision.create_databases(settings), "creating the databases", 30)
        ini = config.write_auth_ini(settings, self.state / "mlflow-auth.ini")
        self._start("mlflow", *config.mlflow_server(settings, ini))
        self._start("prefect", *config.prefect_server(settings, self.state / "prefect"))
        if own_s3:
            self._wait("s3", config.s3_endpoint(settings) + "*", seconds)
        provision.retrying(lambda: provision.create_bucket(settings), "creating the bucket", 30)
        self._wait("prefect", f"{self.prefect_api_url}/health", seconds)
        # The pool's CLI (seconds of imports) runs while MLflow finishes starting.
        with ThreadPoolExecutor(1) as background:
            pool = background.submit(provision.ensure_pool, settings, self.state / "prefect")
            self._wait("mlflow", f"{self.mlflow_url}/health", seconds)
            pool.result()

    def _warn_versions(self) -> None:
        for package, key in PACKAGES.items():
            try:
                installed = metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
            if installed != self.settings[key]:
                print(
                    f"note: {package} {installed} is installed; settings say {key}={self.settings[key]}",
                    file=sys.stderr,
                )

    def _start(self, name: str, argv: list[str], env: dict[str, str], cwd: Optional[Path] = None) -> None:
        base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API_")}
        self.children[name] = processes.start_detached(
            argv, {**base, **env}, cwd or self.state, self._log(name), self._pidfile(name)
        )

    def _wait(self, name: str, url: str, seconds: float) -> None:
        child = self.children[name]
        processes.wait_until_answers(
            url, name, lambda: child.poll() is None, lambda: self._tail(name), seconds
        )

    def start_worker(self, cwd: Path, name: str = "worker", env: Optional[Mapping[str, str]] = None) -> int:
        """A process worker of the work pool in `cwd`, with client credentials only; its PID.

        Its own PREFECT_HOME (cwd/.prefect) unless `env` names one; stopped by down()."""
        argv, extra = config.worker(self.settings, name)
        worker_env = config.client_environ(self.settings, {**os.environ, **(env or {})})
        worker_env.setdefault("PREFECT_HOME", str(Path(cwd) / ".prefect"))
        worker_env["PWD"] = str(Path(cwd).resolve())  # flows/pull_steps.py starts flow runs there
        process = processes.start_detached(
            argv,
            {**worker_env, **extra},
            Path(cwd),
            self._log(f"worker-{name}"),
            self._pidfile(f"worker-{name}"),
        )
        self.children[f"worker-{name}"] = process
        return process.pid

    def down(self) -> None:
        """Stops workers, servers, then PostgreSQL (`pg_ctl stop -m fast`); nothing if none runs."""
        run = self.state / "run"
        workers = sorted(path.stem for path in run.glob("worker-*.pid")) if run.exists() else []
        for name in [*workers, *reversed(SERVERS)]:
            processes.stop_group(self._pidfile(name), child=self.children.pop(name, None))
        self.postgres.stop()

    def upgrade(self, which: str = "all") -> None:
        """Schema migrations (`mlflow db upgrade`, Prefect's), with PostgreSQL up and servers down."""
        if any(name in self.running() for name in SERVERS):
            raise StackError("stop the MLflow and Prefect servers first (down), then upgrade")
        # The script's own PostgreSQL is started for the migrations; any other (compose's) must run.
        started = self.postgres.pid() is None and (self.postgres.data / "PG_VERSION").exists()
        if started:
            self.postgres.start(
                self.settings["POSTGRES_HOST"], self.settings["POSTGRES_PORT"], self.state / "socket"
            )
        try:
            provision.run_steps(
                self.settings, provision.upgrade_commands(self.settings, which, self.state / "prefect")
            )
        finally:
            if started:
                self.postgres.stop()

    def backup(self, folder: Path) -> list[Path]:
        """pg_dump of the three databases into `folder` (the stack must be up)."""
        return provision.backup(self.settings, self.postgres.bindir(), Path(folder))
