"""The floor under a run's overhead against a running Prefect server: a flow of one task that does
nothing, in a process that imports what train_flow.py cannot run without (torch, Prefect, MLflow).

Its wall clock is what any flow with these libraries costs on this machine before it does any
work: starting Python, the imports, creating the flow and task runs, and ending the process
(Prefect joins its flow-run heartbeat thread and flushes its log and event workers).
`benchmarks/overhead.py` runs it beside the training flow, with the same Prefect settings.

    python benchmarks/empty_flow.py
"""

import mlflow  # noqa: F401  (imported for its cost, as train_flow.py imports it)
import torch  # noqa: F401
from prefect import flow, task


@task
def nothing() -> None:
    """A task run, so the floor includes one task's round trip through Prefect."""


@flow(name="empty-flow")
def empty_flow() -> None:
    nothing()


if __name__ == "__main__":
    empty_flow()
