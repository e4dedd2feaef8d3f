"""End-to-end: the team stack started by deploy/stack.py (PostgreSQL, moto's S3 server, MLflow with
basic auth and proxied artefacts, Prefect with API auth), two workers in folders that share
nothing, three trainings at once through the champion gate, and batch prediction started by the
promotion event. Every deployment run of the module is started by one module fixture, all at once,
so the runs share the workers' time and the waits (the gate's lease, the trigger) overlap."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import boto3
import mlflow
import pandas as pd
import pytest
from conftest import REPO, TRAIN_SCRIPT, free_port
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.flow_runs import wait_for_flow_run
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from tasks.data.offline_data import load_digits
from tasks.publish import gate_lock
from tasks.publish.promotion import NOT_PROMOTED, PROMOTED, RESOURCE_PREFIX

sys.path.insert(0, str(REPO / "deploy"))
import stack_settings as config  # noqa: E402
from stack_local import Stack  # noqa: E402
from stack_processes import group_alive  # noqa: E402

# One stack for the module: `pytest -n 2 --dist loadfile` runs a module's tests on one worker.
pytestmark = pytest.mark.slow
NAME = "digits-cnn"  # what train-on-demand registers, and the name prefect.yaml's trigger follows
SEEDS = (1, 2, 3)  # the last one's run is started from the command line
TRAIN, SWEEP, PREDICT = (
    "train-image-classifier/train-on-demand",
    "sweep-image-classifier/sweep",
    "predict-images/predict-batch",
)
PREDICTION = {"registered_model": NAME, "dataset": "digits"}  # the champion on the digits test split
ESCAPED = re.compile(r"\d{8}-\d{6}-escaped-[0-9a-f]{8}")  # the folder of a flow run named ../../escaped
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")  # how `prefect deployment run` names the flow run it made


def checkout(folder: Path) -> Path:
    """A copy of the repository's files, as a worker machine has its own clone: the tracked ones and
    those not yet added (not ignored), so the working tree is what is tested."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


def client_env(stack: Stack, home: Path) -> dict[str, str]:
    """This machine's environment less any MLflow, Prefect or cloud settings, plus the stack's client
    settings: what a team member's shell or a worker machine has."""
    mine = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    return {
        **mine,
        **stack.client_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a run starts within a second of being scheduled
    }


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The stack, `prefect deploy --all` and two workers, each in its own checkout."""
    folder = tmp_path_factory.mktemp("team")
    state = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))  # PostgreSQL's own user must reach it
    state.chmod(0o755)
    ports = {key: free_port() for key in ("POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT")}
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The stack's Prefect server looks for expired gate leases every second, not every 15 s.
            patch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")
            stack = Stack(state, {**ports, "MLFLOW_WORKERS": 1})
            with stack:
                machines = [checkout(folder / f"machine-{index}") for index in range(2)]
                # The workers start (seconds of imports) while `prefect deploy` loads the flows.
                for index, machine in enumerate(machines):
                    stack.start_worker(machine, f"machine-{index}", {"PREFECT_WORKER_QUERY_SECONDS": "1"})
                deployed = subprocess.run(
                    [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                    cwd=machines[0],
                    env=client_env(stack, folder / "home-deploy"),
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
                pids = stack.running()
                yield stack, folder
            # `down` (leaving the block) stops every process the stack started, workers included.
            assert stack.running() == {} and not any(group_alive(pid) for pid in pids.values())
    finally:
        shutil.rmtree(state, ignore_errors=True)


HOLDER = """
from tasks.publish.gate_lock import promotion_gate
with promotion_gate("killed"):
    print("held", flush=True)
    input()  # until it is killed
"""


def gate_freed_after_a_kill(stack: Stack) -> float:
    """A run takes the promotion gate of 'killed' on the stack's Prefect server and is SIGKILLed
    holding it; how long, from the kill, its slot then stayed taken (watched every 0.5 s)."""
    env = {
        **client_env(stack, stack.state / "home-holder"),
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # a tracking server: the gate never calls it
        gate_lock.LEASE_VARIABLE: "60",  # the shortest lease Prefect's server accepts
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        watchdog = threading.Timer(120, holder.kill)  # a holder that never gets in fails the test
        watchdog.start()
        assert holder.stdout.readline() == "held\n"
        watchdog.cancel()
        assert active_slots(stack, "killed") == 1
    finally:
        holder.kill()
        holder.wait()
    killed_at = time.monotonic()
    while active_slots(stack, "killed") and time.monotonic() - killed_at < 150:
        time.sleep(0.5)
    return time.monotonic() - killed_at


def active_slots(stack: Stack, name: str) -> int:
    """Slots taken of `name`'s gate, read from the Prefect API over HTTP (any thread can)."""
    auth = base64.b64encode(stack.client_env()["PREFECT_API_AUTH_STRING"].encode()).decode()
    url = f"{stack.prefect_api_url}/v2/concurrency_limits/{gate_lock.limit_name(name)}"
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    ) as answer:
        return json.load(answer)["active_slots"]


def prefect_settings(stack: Stack):
    """This process's Prefect client settings for the stack, as a context manager."""
    env = stack.client_env()
    return temporary_settings(
        {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
    )


def training(seed: int) -> dict:
    return {"dataset": "digits", "model": "cnn", "epochs": 1, "seed": seed}


@dataclass(frozen=True)
class Runs:
    """What the module's deployment runs left, for its tests to judge."""

    since: datetime  # before any of them started
    trainings: list[FlowRun]  # one per seed, the last one started from the command line
    watched: subprocess.CompletedProcess  # that command line: `prefect deployment run ... --watch`
    gate_freed_after: float  # seconds from the kill of a run holding the gate until its slot was free
    sweep: FlowRun
    refused: FlowRun  # a prediction into a folder outside the worker's roots
    escaped: FlowRun  # a prediction in a flow run named ../../escaped


def run_from_command_line(stack: Stack, folder: Path, config: dict) -> subprocess.CompletedProcess:
    """A train-on-demand run started as docs/team.md says, with custom parameters, watched until it ends."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", TRAIN]
        + ["--param", f"config={json.dumps(config)}", "--watch", "--watch-timeout", "900"],
        env=client_env(stack, folder / "home-cli"),
        capture_output=True,
        text=True,
        timeout=960,
    )


async def start_run(name: str, config: dict, run_name: Optional[str] = None) -> FlowRun:
    """A flow run of deployment `name`, created for a worker to pick up; it is not waited for."""
    return await run_deployment(name, parameters={"config": config}, flow_run_name=run_name, timeout=0)


async def finished(flow_run: FlowRun) -> FlowRun:
    return await wait_for_flow_run(flow_run.id, timeout=900)


async def run_everything(stack: Stack, folder: Path) -> dict:
    """Starts the three trainings, the sweep and a refused prediction together; once the trainings
    are done (the champion is the best of them), a prediction into a slugified folder. Their ends."""
    # While they train, the gate of a run killed inside it frees itself (acceptance: the lease).
    gate = asyncio.create_task(asyncio.to_thread(gate_freed_after_a_kill, stack))
    started = [await start_run(TRAIN, training(seed)) for seed in SEEDS[:-1]]
    from_command_line = asyncio.create_task(
        asyncio.to_thread(run_from_command_line, stack, folder, training(SEEDS[-1]))
    )
    base = {"dataset": "synthetic", "model": "mlp", "epochs": 1, "registered_model": "swept"}
    # One Dask worker process runs both trials; test_sweep_flow shows trials in two of them.
    sweep_config = {"base": base, "grid": {"lr": [0.001, 0.003]}, "task_runner": "dask", "max_parallel": 1}
    sweeping = await start_run(SWEEP, sweep_config)
    refused = await start_run(PREDICT, {**PREDICTION, "output": "/etc/x"})
    trainings = await asyncio.gather(*map(finished, started))
    watched = await from_command_line
    created = UUID.search(watched.stdout)
    assert created, watched.stdout[-3000:] + watched.stderr[-3000:]
    async with get_client() as client:
        trainings.append(await client.read_flow_run(created.group(1)))
    escaped = await start_run(PREDICT, PREDICTION, "../../escaped")  # the name becomes its folder's
    ends = await asyncio.gather(*map(finished, (escaped, refused, sweeping)))
    named = dict(zip(("escaped", "refused", "sweep"), ends))
    return {"trainings": trainings, "watched": watched, "gate_freed_after": await gate, **named}


@pytest.fixture(scope="module")
def runs(team) -> Runs:
    """Every deployment run of the module, started at once: they share the workers' time, and their
    waits overlap."""
    stack, folder = team
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    with prefect_settings(stack):
        return Runs(since=since, **asyncio.run(run_everything(stack, folder)))


async def read_promotions(since: datetime) -> list:
    """The gate's events about NAME since `since` (the sweep's model has events of its own)."""
    wanted = EventFilter(
        occurred=EventOccurredFilter(since=since),
        event=EventNameFilter(name=[PROMOTED, NOT_PROMOTED]),
        resource=EventResourceFilter(id=[RESOURCE_PREFIX + NAME]),
    )
    async with get_client() as client:
        return (await client.read_events(filter=wanted, limit=50)).events


async def triggered_predictions(count: int, ours: set, within: float = 300) -> list:
    """The predict-batch flow runs other than `ours` (those the tests started), once `count` of
    them have finished."""
    deadline = time.monotonic() + within
    predict_batch = DeploymentFilter(name=DeploymentFilterName(any_=["predict-batch"]))
    async with get_client() as client:
        while True:
            found = await client.read_flow_runs(deployment_filter=predict_batch)
            found = [run for run in found if run.id not in ours]
            if (
                len(found) >= count
                and all(run.state.is_final() for run in found)
                or time.monotonic() > deadline
            ):
                return found
            await asyncio.sleep(2)


# How long after the last promotion event a not-promoted event would have started a prediction.
QUIET_SECONDS = 30


def test_three_runs_on_two_workers_crown_the_best_and_its_event_rescores_it(team, runs, monkeypatch):
    stack, folder = team
    for key in [key for key in os.environ if key.startswith(("MLFLOW_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in stack.client_env().items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    # While the runs trained, the gate of a run killed inside it freed itself: by the lease's expiry,
    # not before, not long after.
    assert 30 < runs.gate_freed_after < 60 + 10
    logs = "".join(path.read_text()[-3000:] for path in stack.state.glob("logs/worker-*.log"))
    assert all(run.state.is_completed() for run in runs.trainings), (
        f"{[r.state for r in runs.trainings]}\n{logs}"
    )

    # Three versions per flavor; both champions on the most accurate run.
    client = MlflowClient()
    versions = {
        flavor: client.search_model_versions(f"name = '{flavor}'") for flavor in (NAME, NAME + "-onnx")
    }
    assert {flavor: len(found) for flavor, found in versions.items()} == {NAME: 3, NAME + "-onnx": 3}
    accuracy = {v.run_id: float(v.tags["test_accuracy"]) for v in versions[NAME]}
    champions = [client.get_model_version_by_alias(flavor, "champion") for flavor in versions]
    assert champions[0].run_id == champions[1].run_id
    assert accuracy[champions[0].run_id] == max(accuracy.values())

    # Every artefact is in the bucket, and comes back through the tracking server (no S3 credentials here).
    s3 = stack.server_s3()
    bucket_name = s3.pop("bucket")
    bucket = boto3.client("s3", **s3)
    keys = {
        item["Key"]: item
        for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=bucket_name)
        for item in page.get("Contents", [])
    }
    for version in versions[NAME] + versions[NAME + "-onnx"]:
        assert any(f"/{version.run_id}/artifacts/model_weights.pth" in key for key in keys), version.run_id
        model_id = version.source.removeprefix("models:/")  # the logged model the version registers
        assert any(f"/{model_id}/artifacts/MLmodel" in key for key in keys), version.source
    weights = mlflow.artifacts.download_artifacts(
        f"runs:/{champions[0].run_id}/model_weights.pth", dst_path=str(folder / "download")
    )
    [key] = [key for key in keys if key.endswith(f"/{champions[0].run_id}/artifacts/model_weights.pth")]
    stored = bucket.get_object(Bucket=bucket_name, Key=key)["Body"].read()
    assert hashlib.sha256(Path(weights).read_bytes()).digest() == hashlib.sha256(stored).digest()
    machines = [folder / f"machine-{index}" for index in range(2)]
    assert not any((machine / "mlruns").exists() or (machine / "mlflow.db").exists() for machine in machines)
    assert any((machine / "data" / "prepared").is_dir() for machine in machines)  # each prepares its own

    # One event per run; each promotion (and only those) started predict-batch on the version it named.
    ours = {runs.refused.id, runs.escaped.id}
    with prefect_settings(stack):
        events = asyncio.run(read_promotions(runs.since))
        assert len(events) == 3
        promoted = {str(e.id): e for e in events if e.event == PROMOTED}
        predictions = asyncio.run(triggered_predictions(len(promoted), ours))
        since_last = time.time() - max(e.occurred.timestamp() for e in events)
        time.sleep(max(0.0, QUIET_SECONDS - since_last))  # a not-promoted event would have started one by now
        assert len(asyncio.run(triggered_predictions(len(promoted), ours, within=0))) == len(promoted)
    assert promoted and {e.payload["run_id"] for e in events} == set(accuracy)
    assert max(promoted.values(), key=lambda e: e.occurred).payload["run_id"] == champions[0].run_id
    assert all(run.state.is_completed() for run in predictions), [run.state for run in predictions]
    experiment = client.get_experiment_by_name("image-classifier-predictions")
    recorded = client.search_runs([experiment.experiment_id])
    triggered = [run for run in recorded if "trigger_event" in run.data.tags]
    untriggered = [
        run.data.tags["prefect.flow_run_id"] for run in recorded if "trigger_event" not in run.data.tags
    ]
    assert untriggered == [str(runs.escaped.id)]  # the refused one stopped before its MLflow run
    assert sorted(run.data.tags["trigger_event"] for run in triggered) == sorted(promoted)
    for run in triggered:
        event = promoted[run.data.tags["trigger_event"]]
        assert run.data.tags["model_version"] == event.payload["versions"][NAME + "-onnx"]
        assert run.data.tags["model_source_run_id"] == event.payload["run_id"]
        assert run.data.metrics["accuracy"] > 0.5


def test_wrong_credentials_fail_a_run_at_once_naming_the_server(team):
    stack, folder = team
    for wrong, server in [
        ("MLFLOW_TRACKING_PASSWORD", stack.mlflow_url),
        ("PREFECT_API_AUTH_STRING", stack.prefect_api_url),
    ]:
        env = {**client_env(stack, folder / "home-cli"), wrong: "admin:not-the-s3cret"}
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(TRAIN_SCRIPT), "--dataset", "digits", "--epochs", "1"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0 and time.monotonic() - started < 30, wrong
        assert f"server {server} refused" in done.stderr, done.stderr[-2000:]
        assert "s3cret" not in done.stdout + done.stderr


async def read_deployment(name: str):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def test_every_deployment_runs_on_the_team_stack(team, runs, monkeypatch):
    """The schedule, the sweep on a Dask cluster the run starts, the command line's way to run a
    deployment, prediction into a slugified run folder, and a path outside the worker's roots."""
    stack, folder = team
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    with prefect_settings(stack):
        nightly = asyncio.run(read_deployment("train-image-classifier/train-nightly"))
        sweep = asyncio.run(read_deployment(SWEEP))
    [schedule] = nightly.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert sweep.parameters["config"]["grid"] == {"lr": [0.001, 0.003], "model": ["mlp", "cnn"]}

    # Started the way docs/team.md says, with custom parameters: its run trained with its own seed.
    assert "Completed" in runs.watched.stdout, runs.watched.stdout[-3000:] + runs.watched.stderr[-3000:]
    client = MlflowClient()
    [watched] = client.search_runs(
        [client.get_experiment_by_name("image-classifier").experiment_id],
        f"tags.`prefect.flow_run_id` = '{runs.trainings[-1].id}'",
    )
    assert watched.data.params["seed"] == str(SEEDS[-1])
    assert client.search_model_versions(f"name = '{NAME}' and run_id = '{watched.info.run_id}'")

    # Relative folders: each worker's own, under the root it allows (its working folder); the flow
    # run's name becomes its folder's: slugified, inside output_dir.
    assert runs.escaped.state.is_completed(), runs.escaped.state
    [run_dir] = [path for path in folder.glob("machine-*/outputs/*") if ESCAPED.fullmatch(path.name)]
    table = pd.read_csv(run_dir / "predictions.csv")
    assert len(table) == len(load_digits().test_labels) and table["correct"].mean() > 0.5
    assert (run_dir / "config.json").is_file() and not list(folder.glob("**/escaped"))

    assert runs.refused.state.is_failed(), runs.refused.state
    assert (
        "ParameterOutsideRootsError: parameter output='/etc/x' resolves to /etc/x"
        in runs.refused.state.message
    )

    assert runs.sweep.state.is_completed(), runs.sweep.state
    champion = client.get_model_version_by_alias("swept", "champion")
    parent = client.get_run(client.get_run(champion.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["trials_finished"] == 2 and parent.data.params["task_runner"] == "dask"


def http_status(url: str, auth: str) -> int:
    request = urllib.request.Request(
        url, headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def client_roundtrip(stack: Stack, folder: Path, monkeypatch) -> tuple[str, str]:
    """Logs and downloads an artefact as a client with no AWS credentials; (run id, text back)."""
    for key in [key for key in os.environ if key.startswith(("AWS_", "MLFLOW_S3_"))]:
        monkeypatch.delenv(key)
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(stack.mlflow_url)
    run = client.create_run(client.create_experiment("deploy-test"))
    (folder / "note.txt").write_text("through the tracking server")
    client.log_artifact(run.info.run_id, str(folder / "note.txt"), "notes")
    back = client.download_artifacts(run.info.run_id, "notes/note.txt", str(folder))
    return run.info.run_id, Path(back).read_text()


def test_the_stack_serves_logins_artefacts_and_backups(team, tmp_path, monkeypatch):
    stack, _ = team
    settings = stack.settings
    pids = stack.running()
    assert set(pids) == {"postgres", "s3", "mlflow", "prefect", "worker-machine-0", "worker-machine-1"}
    cmdline = Path(f"/proc/{pids['mlflow']}/cmdline").read_text().split("\0")[:-1]
    assert cmdline == config.mlflow_server(settings, stack.state / "mlflow-auth.ini")[0]

    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search, f"{settings['MLFLOW_ADMIN_USER']}:wrong-password-123") == 401
    assert http_status(search, f"{settings['MLFLOW_ADMIN_USER']}:{settings['MLFLOW_ADMIN_PASSWORD']}") == 200

    run_id, text = client_roundtrip(stack, tmp_path, monkeypatch)
    assert text == "through the tracking server"
    s3 = stack.server_s3()
    bucket = s3.pop("bucket")
    pages = boto3.client("s3", **s3).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/notes/note.txt") for key in keys), keys

    version = f"{stack.prefect_api_url}/admin/version"
    assert http_status(version, "admin:not-the-auth-string") == 401
    assert http_status(version, settings["PREFECT_SERVER_API_AUTH_STRING"]) == 200
    pool = f"{stack.prefect_api_url}/work_pools/{settings['WORK_POOL']}"
    assert http_status(pool, settings["PREFECT_SERVER_API_AUTH_STRING"]) == 200

    dumps = stack.backup(tmp_path / "backup")
    assert [path.name for path in dumps] == ["mlflow.dump", "mlflow_auth.dump", "prefect.dump"]
    assert all(path.stat().st_size > 1000 for path in dumps)
