"""The team stack's command line: PostgreSQL, an S3 store, MLflow (basic auth, artefacts proxied to
S3) and Prefect (API auth, a process work pool), on the settings in deploy/settings.env.

    python deploy/stack.py up [--state-dir DIR]      start everything without Docker; waits for each
    python deploy/stack.py env                       the exports a client needs (prints passwords)
    python deploy/stack.py worker [--cwd DIR]        a process worker of the pool, in the foreground
    python deploy/stack.py down [--state-dir DIR]    stop everything (safe to repeat)

compose.yaml's containers run it too (`serve`, `init`, `create-pool`). A script, never imported by
the modules beside it: stack_local.py (the no-Docker stack), stack_settings.py, stack_processes.py
and stack_provision.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import stack_provision as provision
import stack_settings as config
from stack_local import Stack
from stack_processes import StackError

DESCRIPTION = """The team stack (PostgreSQL, an S3 store, MLflow with basic auth, Prefect with API
auth and a process work pool) without Docker, from installed binaries. Settings: deploy/settings.env;
a variable of the same name in the environment overrides a line there (this script only)."""


def parser() -> argparse.ArgumentParser:
    """The subcommands, each taking --state-dir."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", type=Path, help="PostgreSQL data, logs, pid files (default: STATE_DIR, under deploy/)"
    )
    main = argparse.ArgumentParser(prog="stack.py", description=DESCRIPTION)
    sub = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", parents=[common], help="start every service; wait until each answers")
    sub.add_parser("down", parents=[common], help="stop everything this stack started (safe to repeat)")
    sub.add_parser("status", parents=[common], help="what runs (exit 3 unless everything does)")
    sub.add_parser(
        "env", parents=[common], help="print the exports a client needs: this PRINTS the MLflow password "
        "and the Prefect auth string, its job; no S3 credentials"
    )  # fmt: skip
    worker = sub.add_parser(
        "worker", parents=[common], help="run a process worker of the pool, in the foreground"
    )
    worker.add_argument(
        "--cwd", type=Path, default=Path.cwd(), help="folder flow runs start in (the repository)"
    )
    worker.add_argument("--name", help="worker name (default: Prefect's)")
    serve = sub.add_parser(
        "serve", parents=[common], help="become one server (what compose's containers run)"
    )
    serve.add_argument("service", choices=("s3", "mlflow", "prefect", "worker"))
    sub.add_parser("init", parents=[common], help="create the databases and the bucket (idempotent)")
    sub.add_parser("create-pool", parents=[common], help="create the process work pool (idempotent)")
    upgrade = sub.add_parser(
        "upgrade", parents=[common], help="migrate the databases to the installed versions"
    )
    upgrade.add_argument("which", nargs="?", choices=("all", "mlflow", "prefect"), default="all")
    backup = sub.add_parser(
        "backup", parents=[common], help="pg_dump the three databases (the stack must be up)"
    )
    backup.add_argument("--to", type=Path, required=True, help="folder for NAME.dump files")
    return main


def up(stack: Stack, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack.up()
    settings = stack.settings
    s3 = settings["S3_ENDPOINT_URL"] or f"{config.s3_endpoint(settings)} (moto: objects in memory only)"
    print(f"stack up in {time.monotonic() - started:.0f} s; state in {stack.state}")
    postgres = f"{settings['POSTGRES_HOST']}:{settings['POSTGRES_PORT']}"
    print(f"  PostgreSQL  {settings['POSTGRES_VERSION']} on {postgres}")
    print(f"  S3          {s3}, bucket {settings['S3_BUCKET']}")
    print(f"  MLflow      {stack.mlflow_url} (basic auth)")
    print(f"  Prefect     {stack.prefect_api_url} (API auth; work pool {settings['WORK_POOL']})")
    print('Point a client at it: eval "$(python deploy/stack.py env)"')
    return 0


def status(stack: Stack, args: argparse.Namespace) -> int:
    running = stack.running()
    wanted = ["postgres", "mlflow", "prefect"] + ([] if stack.settings["S3_ENDPOINT_URL"] else ["s3"])
    for name in sorted(set(wanted) | set(running)):
        print(f"{name:16} {'running, pid ' + str(running[name]) if name in running else 'stopped'}")
    return 0 if all(name in running for name in wanted) else 3


def env(stack: Stack, args: argparse.Namespace) -> int:
    for key, value in stack.client_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def exec_service(stack: Stack, args: argparse.Namespace) -> int:
    """Replaces this process with the server, so a container's signals reach it directly."""
    settings = stack.settings
    if args.service == "s3":
        argv, extra = config.s3_server(settings)
    elif args.service == "mlflow":
        ini = config.write_auth_ini(settings, stack.state / "mlflow-auth.ini")
        argv, extra = config.mlflow_server(settings, ini)
    elif args.service == "prefect":
        argv, extra = config.prefect_server(settings, stack.state / "prefect")
    else:
        return run_worker(stack, args)
    os.execve(argv[0], argv, {**os.environ, **extra})


def run_worker(stack: Stack, args: argparse.Namespace) -> int:
    """Replaces this process with a worker started in --cwd, holding client credentials only."""
    argv, extra = config.worker(stack.settings, getattr(args, "name", None))
    folder = (getattr(args, "cwd", None) or Path.cwd()).resolve()
    os.chdir(folder)
    env = {**config.client_environ(stack.settings, os.environ), **extra, "PWD": str(folder)}
    os.execve(argv[0], argv, env)  # PWD: flows/pull_steps.py starts flow runs in the worker's folder


def init(stack: Stack, args: argparse.Namespace) -> int:
    created = provision.retrying(lambda: provision.create_databases(stack.settings), "creating the databases")
    made = provision.retrying(lambda: provision.create_bucket(stack.settings), "creating the bucket")
    print(f"databases created: {created or 'none (all exist)'}; bucket created: {made}")
    return 0


def create_pool(stack: Stack, args: argparse.Namespace) -> int:
    made = provision.retrying(
        lambda: provision.ensure_pool(stack.settings, stack.state / "prefect"), "work pool", 120
    )
    print(f"work pool {stack.settings['WORK_POOL']}: {'created' if made else 'exists'}")
    return 0


COMMANDS: dict[str, Callable[[Stack, argparse.Namespace], Optional[int]]] = {
    "up": up,
    "down": lambda stack, args: stack.down(),
    "status": status,
    "env": env,
    "worker": run_worker,
    "serve": exec_service,
    "init": init,
    "create-pool": create_pool,
    "upgrade": lambda stack, args: stack.upgrade(args.which),
    "backup": lambda stack, args: print("\n".join(map(str, stack.backup(args.to)))),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Runs one subcommand; a failure prints one line (secrets redacted) and returns 1."""
    args = parser().parse_args(argv)
    stack = None
    try:
        stack = Stack(args.state_dir)
        return COMMANDS[args.command](stack, args) or 0
    except (StackError, RuntimeError, ValueError, OSError) as error:
        message = config.redact(str(error), stack.settings) if stack else str(error)
        print(f"stack.py {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
