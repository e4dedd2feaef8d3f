"""The screenshots of docs/records.md: one tiny training against real servers, shot with chromium.

Starts a Prefect server and an MLflow tracking server on free 127.0.0.1 ports (their databases in
a scratch folder), runs `python flows/train_flow.py --dataset digits --epochs 1` against them,
then takes headless chromium screenshots of the MLflow run page, the registered model page, the
Prefect flow run page and the Prefect artifacts page, and writes them to docs/images/. Whatever
happens, it stops every process it started and removes the scratch folder.

Chromium is driven over its DevTools protocol (through `websockets`, which Prefect installs), so
that each page starts with MLflow's assistant panel closed: on a server at 127.0.0.1 MLflow opens
it on a first visit, over a quarter of the page.

    python docs/screenshots.py [--chromium chromium] [--keep DIR]
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
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

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
MODEL = "digits-cnn"  # the registered name of `--dataset digits` with the default model
VIEWPORT = {"width": 1600, "height": 1000}  # pixels of each screenshot
# Run in every page before its own scripts: the browser's storage says the visitor has seen MLflow's
# assistant panel and closed it (the keys of MLflow 3's UI, `<key>_v1`, JSON values), so the UI
# neither opens it on a first visit nor reopens it.
ASSISTANT_CLOSED = """
try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (error) {}
"""


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
    """One headless chromium screenshot of `url`, with MLflow's assistant panel closed. The pages
    are single-page apps: virtual time lets their scripts fetch and draw before the shot."""
    command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += ["--hide-scrollbars", "--remote-debugging-port=0", "about:blank"]
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    log = profile.parent / "chromium.log"
    with open(log, "w") as output:
        browser = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        with DevTools(page_socket(profile, browser, log)) as page:
            page.call("Page.enable")
            page.call("Emulation.setDeviceMetricsOverride", **VIEWPORT, deviceScaleFactor=1, mobile=False)
            page.call("Page.addScriptToEvaluateOnNewDocument", source=ASSISTANT_CLOSED)
            page.call("Page.navigate", url=url)
            page.wait_for("Page.loadEventFired")  # a budget set before this runs out while navigating
            page.call("Emulation.setVirtualTimePolicy", policy="pauseIfNetworkFetchesPending", budget=15000)
            page.wait_for("Emulation.virtualTimeBudgetExpired")
            shot = page.call("Page.captureScreenshot", format="png")
        image.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.terminate()
        browser.wait(timeout=30)


def page_socket(profile: Path, browser: subprocess.Popen, log: Path, seconds: float = 60) -> str:
    """The DevTools WebSocket URL of the browser's first page, once chromium has written its port."""
    port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + seconds
    while not port_file.is_file() or not port_file.read_text().strip():
        if browser.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"chromium did not start its DevTools server:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
        page = next(target for target in json.load(answer) if target["type"] == "page")
    return page["webSocketDebuggerUrl"]


class DevTools:
    """Commands to one page over chromium's DevTools protocol, and the events it sends back."""

    def __init__(self, socket_url: str) -> None:
        self.socket = connect(socket_url, max_size=None, open_timeout=30)
        self.ids, self.events = itertools.count(1), []

    def __enter__(self) -> "DevTools":
        return self

    def __exit__(self, *_: object) -> None:
        self.socket.close()

    def call(self, method: str, **params: object) -> dict:
        """Sends a command; its result, once it comes (events that come first are kept)."""
        number = next(self.ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = self.receive()
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> None:
        while not any(message.get("method") == event for message in self.events):
            self.events.append(self.receive())

    def receive(self, seconds: float = 120) -> dict:
        return json.loads(self.socket.recv(timeout=seconds))


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
