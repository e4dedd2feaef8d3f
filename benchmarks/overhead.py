"""Overhead: a train_flow.py run's wall clock minus its training, by step.

Runs `python flows/train_flow.py` as a user would, twice: with Prefect's temporary server (no
PREFECT_API_URL) and against a running `prefect server start` on 127.0.0.1 (started and stopped
here). Training is the train-model task; everything else (imports, server start, data, MLflow,
evaluation, export, ONNX check, registration, reports) is overhead. The steps' times are read
back from Prefect's task runs.

Beside each run it times `benchmarks/empty_flow.py`, a one-task flow that does nothing but import
torch, Prefect and MLflow. Against a running server that is the floor: no flow with these
libraries ends sooner on this machine. Without one, both start and wait for Prefect's own
temporary server after their imports.

By default the run is the default run (one epoch) on the generated 60k set
(`benchmarks/digits60k.py`), so evaluation and the ONNX check see a 10,000-image test split.

Writes the breakdowns to benchmarks/results/overhead.md.

    python benchmarks/overhead.py [--dataset fashion-mnist] [--epochs 1] [--data-dir DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.digits60k import write_digits60k  # noqa: E402
from benchmarks.flow_steps import flow_run_times, latest_flow_run_id  # noqa: E402
from benchmarks.results_file import Printed, write_result  # noqa: E402

out = Printed()  # what main prints goes to the results file too


def run_flow(env: dict, args, scratch: Path) -> dict:
    """Runs the flow once; returns its wall clock, flow run id and the step times."""
    mlflow_db = scratch.parent / "mlflow.db"  # shared with the warm-up run, as a user's is
    command = [sys.executable, "flows/train_flow.py", "--dataset", args.dataset, "--epochs", str(args.epochs)]
    command += ["--data-dir", str(args.data_dir), "--output-dir", str(scratch / "outputs")]
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"}
    started = time.time()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    ended = time.time()
    return {"wall": (started, ended), **flow_run_times(env, latest_flow_run_id(mlflow_db))}


def training(timing: dict) -> float:
    """Seconds in the train-model step."""
    return sum(end - start for name, start, end in timing["steps"] if name.startswith("train-model"))


def overhead(timing: dict) -> float:
    """Wall clock minus training, in seconds."""
    started, ended = timing["wall"]
    return ended - started - training(timing)


def empty_flow_wall(env: dict) -> float:
    """Seconds `benchmarks/empty_flow.py` takes, start to exit."""
    started = time.time()
    subprocess.run(
        [sys.executable, "benchmarks/empty_flow.py"], cwd=REPO, env=env, check=True, capture_output=True
    )
    return time.time() - started


def timed_runs(env: dict, args, scratch: Path, title: str) -> tuple[float, float]:
    """A warm-up run, then `args.runs` timed ones, each followed by the empty flow; prints the
    median run's breakdown and the empty flow's time, and returns both medians (this
    machine is shared: single runs vary by a second or two)."""
    run_flow(env, args, scratch / "warm")
    empty_flow_wall(env)
    timings, floors = [], []
    for i in range(args.runs):
        timings.append(run_flow(env, args, scratch / f"run{i}"))
        floors.append(empty_flow_wall(env))
    timings.sort(key=overhead)
    floors.sort()
    median, floor = timings[len(timings) // 2], floors[len(floors) // 2]
    if args.runs > 1:
        title += f" (median of {args.runs} runs: {', '.join(f'{overhead(t):.1f}' for t in timings)} s)"
    seconds = show(title, median)
    out(
        f"  empty flow (one task, imports torch, Prefect and MLflow, does nothing): {floor:.1f} s "
        f"({', '.join(f'{f:.1f}' for f in floors)}); the overhead beyond it: {seconds - floor:.1f} s"
    )
    return seconds, floor


def show(title: str, timing: dict) -> float:
    """Prints the breakdown; returns the overhead in seconds."""
    (started, ended), steps = timing["wall"], timing["steps"]
    out(f"\n{title}: wall clock {ended - started:.1f} s, training {training(timing):.1f} s")
    out(f"  {'start-up (imports, server, flow run)':40s} {timing['start'] - started:6.2f} s")
    for name, start, end in steps:
        if not name.startswith("train-model"):
            out(f"  {name:40s} {end - start:6.2f} s")
    out(f"  {'after the flow run (exit)':40s} {ended - timing['end']:6.2f} s")
    seconds = overhead(timing)
    out(f"  overhead: {seconds:.1f} s")
    return seconds


def start_prefect_server(env: dict) -> tuple[subprocess.Popen, str]:
    port = 4200 + os.getpid() % 500
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    raise RuntimeError("the Prefect server did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "benchmarks")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (the median is shown)")
    args = parser.parse_args()
    if args.dataset == "fashion-mnist":
        write_digits60k(args.data_dir)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        temporary = {**base, "PREFECT_HOME": str(scratch / "prefect-temporary")}
        # The warm-up run creates the Prefect and MLflow databases, as a user's first run does once.
        results = {"temporary server": timed_runs(temporary, args, scratch, "temporary server")}
        running = {**base, "PREFECT_HOME": str(scratch / "prefect-running")}
        server, url = start_prefect_server(running)
        try:
            running["PREFECT_API_URL"] = url
            results["running server"] = timed_runs(running, args, scratch, "running server")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    out(
        "\n"
        + ", ".join(
            f"{mode}: {seconds:.1f} s overhead, empty flow {floor:.1f} s ({seconds / floor:.2f}x)"
            for mode, (seconds, floor) in results.items()
        )
    )
    write_result("overhead", "Overhead: a run's wall clock minus its training, by step", out.block())


if __name__ == "__main__":
    main()
