"""The screenshots of docs/records.md: one tiny training against real servers, shot with chromium.

Starts a Prefect server and an MLflow tracking server on free 127.0.0.1 ports (their databases in
a scratch folder), runs `python flows/train_flow.py --dataset digits --epochs 1` against them,
then takes headless chromium screenshots of the MLflow run page, the registered model page, the
Prefect flow run page and the Prefect artifacts page, and writes them to docs/images/. Whatever
happens, it stops every process it started and removes the scratch folder.

    python docs/screenshots.py [--chromium chromium] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
MODEL = "digits-cnn"  # the registered name of `--dataset digits` with the default model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Servers in process groups of their own, all stopped by stop_all, also after a failure."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.started = folder, env, []

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", *argv],
                cwd=self.folder,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its children (uvicorn workers) stop with it
            )
        self.started.append((name, process))
        return process

    def wait_until_up(self, name: str, url: str, seconds: float = 180) -> None:
        process = dict(self.started)[name]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{name} did not answer at {url} within {seconds:.0f} s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in self.started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def start_servers(processes: Processes, scratch: Path) -> tuple[str, str]:
    """A Prefect server and an MLflow server on free ports; their URLs once both answer."""
    prefect_port, mlflow_port = free_port(), free_port()
    # The UI asks the API at this URL (its default is port 4200's); no telemetry from a scratch server.
    processes.env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{prefect_port}/api"
    processes.env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    processes.start(
        "prefect", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)
    )
    processes.start(
        "mlflow",
        *("mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{scratch / 'mlflow.db'}"),
        *("--artifacts-destination", str(scratch / "mlflow-artifacts")),
    )
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    processes.wait_until_up("prefect", prefect + "/api/health")
    processes.wait_until_up("mlflow", mlflow + "/health")
    return prefect, mlflow


def train(env: dict[str, str], scratch: Path) -> None:
    """The tiny training the pages show, as a user runs it."""
    command = [sys.executable, "flows/train_flow.py", "--dataset", "digits", "--epochs", "1"]
    command += ["--data-dir", str(scratch / "data"), "--output-dir", str(scratch / "outputs")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(
            f"the training failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def pages(prefect: str, mlflow: str) -> dict[str, str]:
    """Image name: URL of the page it shows, for the run just trained."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow)
    version = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(version.run_id)
    experiment, flow_run = run.info.experiment_id, run.data.tags["prefect.flow_run_id"]
    return {
        "mlflow-run": f"{mlflow}/#/experiments/{experiment}/runs/{run.info.run_id}",
        "mlflow-registered-model": f"{mlflow}/#/models/{MODEL}",
        "prefect-flow-run": f"{prefect}/runs/flow-run/{flow_run}",
        "prefect-artifacts": f"{prefect}/artifacts",
    }


def shoot(chromium: str, url: str, image: Path, profile: Path) -> None:
    """One headless chromium screenshot; the pages are single-page apps, so virtual time lets their
    scripts fetch and draw before the shot."""
    command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += ["--hide-scrollbars", f"--screenshot={image}", "--window-size=1600,1000"]
    command += ["--virtual-time-budget=15000", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode or not image.is_file():
        raise RuntimeError(f"chromium could not shoot {url} ({done.returncode}):\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--keep", type=Path, help="keep the scratch folder (server logs, databases) here")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="screenshots-", dir=args.keep))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env = {**base, "PREFECT_HOME": str(scratch / "prefect"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    processes = Processes(scratch, env)
    try:
        prefect, mlflow = start_servers(processes, scratch)
        train({**env, "PREFECT_API_URL": prefect + "/api", "MLFLOW_TRACKING_URI": mlflow}, scratch)
        shots = scratch / "shots"
        shots.mkdir()
        for name, url in pages(prefect, mlflow).items():
            shoot(args.chromium, url, shots / f"{name}.png", scratch / "chromium")
            print(f"{name}: {url}")
        IMAGES.mkdir(parents=True, exist_ok=True)
        names = sorted(image.name for image in shots.iterdir())
        for name in names:  # only once every page is shot: never half a set
            shutil.copyfile(shots / name, IMAGES / name)
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {', '.join(names)} to {IMAGES}")


if __name__ == "__main__":
    main()
