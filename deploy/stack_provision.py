"""One-off steps on a running stack: its databases, bucket and work pool (each safe to repeat),
schema upgrades and backups. compose's one-shot containers run the same functions."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from stack_settings import (
    MLFLOW_DRIVER,
    Command,
    Settings,
    client_environ,
    create_pool,
    postgres_url,
    prefect_api_url,
    redact,
    server_s3,
)

T = TypeVar("T")


def retrying(step: Callable[[], T], what: str, seconds: float = 60) -> T:
    """`step()`, retried while the service it needs is still coming up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return step()
        except Exception as error:  # noqa: BLE001 - the driver's errors differ; the last one is raised
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} failed for {seconds:.0f} s: {error}") from error
            time.sleep(1)


def create_databases(settings: Settings) -> list[str]:
    """Creates the MLflow, MLflow-auth and Prefect databases that do not exist yet; their names."""
    import psycopg2  # only the MLflow image and the script's environment have it

    names = [settings[key] for key in ("MLFLOW_DB", "MLFLOW_AUTH_DB", "PREFECT_DB")]
    connection = psycopg2.connect(postgres_url(settings, "postgres"), connect_timeout=10)
    connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
    created = []
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')  # a validated identifier
                    created.append(name)
    finally:
        connection.close()
    return created


def s3_client(settings: Settings):
    """A boto3 S3 client with the server's credentials (never a client's)."""
    import boto3  # like psycopg2: not in the Prefect image, whose containers never call this

    s3 = server_s3(settings)
    s3.pop("bucket")
    return boto3.client("s3", **s3)


def create_bucket(settings: Settings) -> bool:
    """Creates the artefact bucket unless it exists; whether it did."""
    from botocore.exceptions import ClientError

    client, bucket = s3_client(settings), settings["S3_BUCKET"]
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
    region = settings["S3_REGION"]
    where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=bucket, **where)
    return True


def prefect_get(settings: Settings, path: str) -> tuple[int, dict]:
    """GET on the Prefect API with the auth string; (status, JSON body)."""
    token = base64.b64encode(settings["PREFECT_SERVER_API_AUTH_STRING"].encode()).decode()
    request = urllib.request.Request(f"{prefect_api_url(settings)}{path}")
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}


def ensure_pool(settings: Settings, prefect_home: Path) -> bool:
    """Creates the process work pool unless it exists; whether it did. Refuses one of another type."""
    name = settings["WORK_POOL"]
    status, pool = prefect_get(settings, f"/work_pools/{name}")
    if status == 200:
        if pool.get("type") != "process":
            raise RuntimeError(f"work pool {name!r} exists with type {pool.get('type')!r}, not 'process'")
        return False
    if status != 404:
        raise RuntimeError(f"the Prefect API answered {status} when asked for work pool {name!r}")
    argv, env = create_pool(settings)
    env = {**client_environ(settings, os.environ), **env, "PREFECT_HOME": str(prefect_home)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(
            redact(f"creating work pool {name!r} failed:\n{done.stdout}{done.stderr}", settings)
        )
    return True


def upgrade_commands(settings: Settings, which: str, prefect_home: Path) -> list[Command]:
    """Schema migrations of MLflow's tracking and auth databases and/or Prefect's database."""
    commands: list[Command] = []
    if which in ("mlflow", "all"):
        tracking, auth = (
            postgres_url(settings, settings[key], MLFLOW_DRIVER) for key in ("MLFLOW_DB", "MLFLOW_AUTH_DB")
        )
        commands.append(([sys.executable, "-m", "mlflow", "db", "upgrade", tracking], {}))
        commands.append(([sys.executable, "-m", "mlflow.server.auth", "db", "upgrade", "--url", auth], {}))
    if which in ("prefect", "all"):
        url = postgres_url(settings, settings["PREFECT_DB"], driver="postgresql+asyncpg")
        env = {"PREFECT_API_DATABASE_CONNECTION_URL": url, "PREFECT_HOME": str(prefect_home)}
        commands.append(([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env))
    return commands


def run_steps(settings: Settings, commands: list[Command]) -> None:
    """Runs each command; stops at the first failure with its (redacted) output."""
    for argv, env in commands:
        done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
        shown = redact(" ".join(argv[2:]), settings)  # `python -m` dropped; passwords never shown
        if done.returncode != 0:
            raise RuntimeError(
                redact(f"{shown} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", settings)
            )
        print(f"done: {shown}")


def backup(settings: Settings, bindir: Path, folder: Path) -> list[Path]:
    """pg_dump (custom format) of each of the stack's databases into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PGPASSWORD": settings["POSTGRES_PASSWORD"]}
    written = []
    for key in ("MLFLOW_DB", "MLFLOW_AUTH_DB", "PREFECT_DB"):
        target = folder / f"{settings[key]}.dump"
        argv = [str(bindir / "pg_dump"), "-Fc", "-f", str(target), "-h", settings["POSTGRES_HOST"]]
        argv += ["-p", settings["POSTGRES_PORT"], "-U", settings["POSTGRES_USER"], settings[key]]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(redact(f"pg_dump of {settings[key]} failed:\n{done.stderr[-2000:]}", settings))
        written.append(target)
    return written
