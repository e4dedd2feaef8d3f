"""One run at a time through a registered name's promotion gate (read the champion, decide, move
the aliases), so two runs finishing together cannot both promote and leave the worse one champion.

A local tracking store (the default `sqlite:///mlflow.db`, or a folder) can only be shared by
processes on one machine: an OS file lock beside it serialises them, and the OS releases it when
a holder dies. A tracking server may be shared by runs on several machines, so its lock must live
where they all look: a Prefect global concurrency limit of one slot per name on the team's Prefect
server. A run against a tracking server without PREFECT_API_URL would run on Prefect's temporary
server and take a lock nobody else sees, so it is refused (require_shared_prefect, which a run
calls before its work). Holders take the slot under a lease that they renew while they hold it:
when a holder dies, the server's repossessor service frees the slot once the lease runs out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
from typing import Iterator

import mlflow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from common.errors import UserError
from common.files import file_lock
from common.redaction import redact_url
from tasks.track.tracking import local_store

GATE_TIMEOUT_SECONDS = 300  # the gate itself takes seconds; anything longer is a stuck holder
LEASE_VARIABLE = "PIC_GATE_LEASE_SECONDS"
# Prefect's server refuses leases under 60 s or over a day; a dead holder's slot is free within
# the lease plus the repossessor's loop (15 s by default).
LEASE_BOUNDS = (60.0, 86400.0)
GATE_LEASE_SECONDS = 60.0
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986's unreserved characters


class GateBusyError(UserError, TimeoutError):
    """The promotion gate stayed held by another run."""


class GateMisconfiguredError(UserError, RuntimeError):
    """The Prefect limit that serves as the promotion gate would not let one run in at a time."""


class PrefectNotSharedError(UserError, RuntimeError):
    """The tracking store is a server, but the run's Prefect API is not one other machines share."""


def require_shared_prefect() -> None:
    """Raises PrefectNotSharedError when the tracking store is a server (runs on other machines may
    share it) and no Prefect server is configured (PREFECT_API_URL, in the environment or the active
    profile): the run would be on Prefect's temporary server. Runs call it once, before their work;
    promotion_gate does not ask again."""
    uri = mlflow.get_tracking_uri()
    if local_store(uri) or get_current_settings().api.url:
        return
    raise PrefectNotSharedError(
        f"the MLflow tracking store {redact_url(uri)} is a server that runs on other machines may "
        "share, but no PREFECT_API_URL is set, so the run would use a temporary Prefect server of its "
        "own: the champion gate's lock would hold for this run alone. Set PREFECT_API_URL (and "
        "PREFECT_API_AUTH_STRING, if the server asks for one) to your team's Prefect server, e.g. "
        "PREFECT_API_URL=http://prefect.example:4200/api"
    )


@contextlib.contextmanager
def promotion_gate(name: str) -> Iterator[None]:
    """Holds `name`'s promotion gate for the block (on a tracking server, after the caller's
    require_shared_prefect)."""
    store = local_store(mlflow.get_tracking_uri())
    # One lock file per local store, whatever the name: gates take a second, so sharing costs nothing.
    lock = file_lock(store.with_name(f".{store.name}.promotion.lock")) if store else _prefect_lock(name)
    with lock:
        yield


def limit_name(name: str) -> str:
    """The Prefect global concurrency limit that is `name`'s gate: `champion-gate-<name>` for a name
    of letters, digits and `._~-`. In other names those characters become `_` and `-` and the first
    8 hex digits of the name's sha256 follow (`a b` -> `champion-gate-a_b-` and the digits), so two
    names never share a gate: Prefect refuses / % & < > in a limit's name, and its client puts the
    name into a URL path unquoted, where ? and # would end the path."""
    if _URL_SAFE.fullmatch(name):
        return f"champion-gate-{name}"
    readable = re.sub(r"[^A-Za-z0-9._~-]", "_", name)
    return f"champion-gate-{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def lease_seconds() -> float:
    """The gate's lease: PIC_GATE_LEASE_SECONDS, else GATE_LEASE_SECONDS."""
    text = os.environ.get(LEASE_VARIABLE)
    if text is None:
        return GATE_LEASE_SECONDS
    low, high = LEASE_BOUNDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:
        raise GateMisconfiguredError(
            f"{LEASE_VARIABLE}={text!r}: expected a number of seconds from {low:.0f} to {high:.0f} "
            "(what Prefect's server accepts for a lease)"
        )
    return seconds


@contextlib.contextmanager
def _prefect_lock(name: str) -> Iterator[None]:
    limit, lease = limit_name(name), lease_seconds()
    command = f"prefect gcl update {shlex.quote(limit)}"  # as a shell takes it: names may have spaces
    _check_limit(name, limit, create=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                concurrency(limit, timeout_seconds=GATE_TIMEOUT_SECONDS, lease_duration=lease, strict=True)
            )
        except TimeoutError as error:
            raise GateBusyError(
                f"the promotion gate of {name!r} (Prefect global concurrency limit {limit!r}) stayed "
                f"held for {GATE_TIMEOUT_SECONDS} s. A run that dies holding it frees it within its "
                f"{lease:.0f} s lease (when the Prefect server runs its repossessor service); if no run "
                f"is registering {name!r}, `{command} --active-slots 0` frees it"
            ) from error
        # Deactivated while this run waited, it would have let the run in without taking a slot.
        _check_limit(name, limit, create=False)
        yield


def _check_limit(name: str, limit: str, create: bool) -> None:
    """Raises GateMisconfiguredError unless `limit` has exactly one slot, is active and does not
    decay; creates it (with `create`) when it does not exist."""
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            if not create:
                raise
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            found = client.read_global_concurrency_limit_by_name(limit)
    problems = [
        *([f"has {found.limit} slots"] if found.limit != 1 else []),
        *(["is inactive"] if not found.active else []),
        *(
            [f"has slots that decay by {found.slot_decay_per_second}/s"]
            if found.slot_decay_per_second
            else []
        ),
    ]
    if problems:
        raise GateMisconfiguredError(
            f"the promotion gate of {name!r} is Prefect global concurrency limit {limit!r}, which "
            f"{', '.join(problems)}; a gate needs exactly 1 slot, active, no decay, or runs "
            f"would promote at the same time. Fix it with `prefect gcl update {shlex.quote(limit)} --limit 1 "
            "--enable --slot-decay-per-second 0`"
        )
