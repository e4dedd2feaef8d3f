"""One run at a time through a registered name's promotion gate (read the champion, decide, move
the aliases), so two runs finishing together cannot both promote and leave the worse one champion.

A local tracking store (the default `sqlite:///mlflow.db`, or a folder) can only be shared by
processes on one machine: an OS file lock beside it serialises them, and the OS releases it when
a holder dies. A remote store (HTTP) may be shared by runs on several machines, which then share
a Prefect API: a Prefect global concurrency limit of one slot per name serialises them, and a
running server's lease service frees the slot of a run that dies holding it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Iterator

import mlflow

from tasks.files import file_lock
from tasks.track.tracking import local_store

GATE_TIMEOUT_SECONDS = 300  # the gate itself takes about a second; anything longer is a stuck holder


class GateBusyError(TimeoutError):
    """The promotion gate stayed held by another run."""


@contextlib.contextmanager
def promotion_gate(name: str) -> Iterator[None]:
    """Holds `name`'s promotion gate for the block."""
    store = local_store(mlflow.get_tracking_uri())
    # One lock file per local store, whatever the name: gates take a second, so sharing costs nothing.
    lock = file_lock(store.with_name(f".{store.name}.promotion.lock")) if store else _prefect_lock(name)
    with lock:
        yield


def _slug(name: str) -> str:
    """`name` in characters Prefect accepts in a limit's name, unique per name."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _prefect_lock(name: str) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = f"champion-gate-{_slug(name)}"
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(concurrency(limit, timeout_seconds=GATE_TIMEOUT_SECONDS, strict=True))
        except TimeoutError as error:
            raise GateBusyError(
                f"the promotion gate of {name!r} (Prefect global concurrency limit {limit!r}) stayed "
                f"held for {GATE_TIMEOUT_SECONDS} s; if no other run is registering {name!r}, a run "
                f"died holding it: `prefect gcl update {limit} --active-slots 0` frees it"
            ) from error
        yield
