"""For benchmarks: when a flow run and its task runs started and ended, read back from Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Read back in a child with the same Prefect settings as the run (its own temporary server reads
# the temporary server's database).
REPORT = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

async def main(flow_run_id):
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    steps = [
        (t.name, t.start_time.timestamp(), t.end_time.timestamp())
        for t in tasks if t.start_time and t.end_time
    ]
    print(json.dumps({"start": flow_run.start_time.timestamp(), "end": flow_run.end_time.timestamp(),
                      "steps": sorted(steps, key=lambda s: s[1])}))

asyncio.run(main(sys.argv[1]))
"""


def flow_run_times(env: dict, flow_run_id: str) -> dict:
    """{"start", "end", "steps": [(task run name, start, end)]} in epoch seconds, read with `env`'s
    Prefect settings."""
    out = subprocess.run(
        [sys.executable, "-c", REPORT, flow_run_id], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def latest_flow_run_id(mlflow_db: Path) -> str:
    """The Prefect flow run of the newest MLflow run in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_db}")
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"], max_results=1
    )[0]
    return run.data.tags["prefect.flow_run_id"]
