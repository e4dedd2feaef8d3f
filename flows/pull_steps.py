"""Pull steps of prefect.yaml's deployments, run by each flow run on its worker's machine."""

from __future__ import annotations

import os


def start_in_worker_folder() -> dict[str, str]:
    """Changes to the folder the worker was started from (its $PWD, else its working directory), so
    entrypoints and relative paths resolve in that machine's checkout. `{{ $PWD }}` in prefect.yaml
    would not do: `prefect deploy` fills it in with the deploying machine's folder."""
    folder = os.environ.get("PWD") or os.getcwd()
    os.chdir(folder)
    return {"directory": folder}
