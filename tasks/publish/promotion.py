"""Inside the promotion gate: both flavors' champions kept on one run, moves by hand, and every
outcome announced as a Prefect event, which deployment triggers (prefect.yaml's predict-batch)
react to.

The event contract (prefect.yaml's triggers template these fields):
  event     image-classifier.model.promoted, or image-classifier.model.not-promoted
  resource  {"prefect.resource.id": "mlflow.registered-model.<NAME>", "prefect.resource.name": NAME}
  payload   version (NAME's, str), versions ({registered name: version}, both flavors), alias,
            reason, test_accuracy (float or null), run_id, dataset_sha256, previous_version (NAME's
            champion before, or null) and by_hand (bool)
NAME is the PyTorch flavor's registered name; the ONNX flavor is NAME-onnx.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from prefect.events import emit_event
from prefect.settings import get_current_settings

from common import compat
from common.errors import UserError
from tasks.publish import gate_lock, registry
from tasks.publish.registry import CHAMPION, ONNX_SUFFIX, Candidate, Decision
from tasks.track.tracking import get_client

PROMOTED = "image-classifier.model.promoted"
NOT_PROMOTED = "image-classifier.model.not-promoted"
RESOURCE_PREFIX = "mlflow.registered-model."
DELIVERY_SECONDS = 30  # a run ends right after its gate: its event must be sent before


class PromotionRefusedError(UserError, ValueError):
    """A move by hand that names no such version, or one the gate refuses."""


@dataclass(frozen=True)
class Outcome:
    """What a pass through the gate did, as its event tells it."""

    name: str
    versions: dict[str, str]
    alias: str
    reason: str
    test_accuracy: Optional[float]
    run_id: str
    dataset_sha256: str
    previous_version: Optional[str] = None
    by_hand: bool = False


def align_champions(names: Sequence[str]) -> Optional[ModelVersion]:
    """Points each other name's `champion` at the version that the run of the first name's champion
    registered (a run killed between its alias moves leaves them apart); returns that champion."""
    champion = registry.champion_version(names[0])
    if champion is None:
        return None
    for name in names[1:]:
        version = registry.version_of_run(name, champion.run_id)
        current = registry.champion_version(name)
        if version is None or (current is not None and str(current.version) == version):
            continue
        get_client().set_registered_model_alias(name, CHAMPION, version)
        was = current.version if current else "none"
        print(f"repaired {name}@{CHAMPION}: {was} -> {version}, from the run of {names[0]}@{CHAMPION}")
    return champion


def announce(outcome: Outcome) -> Optional[str]:
    """Emits the outcome's event and waits until it is sent (DELIVERY_SECONDS at most); its id, or
    None when Prefect has no events client here."""
    event = emit_event(
        event_name(outcome),
        resource={
            "prefect.resource.id": RESOURCE_PREFIX + outcome.name,
            "prefect.resource.name": outcome.name,
        },
        payload={"version": outcome.versions[outcome.name], **asdict(outcome)},
    )
    if event is None:
        print(f"warning: no Prefect events client here; the {event_name(outcome)} event was not sent")
        return None
    try:
        sent = compat.wait_for_events(DELIVERY_SECONDS)
    except compat.CompatError as error:  # the event is queued: Prefect still sends it at exit
        print(f"warning: could not wait for the {event.event} event {event.id} to be sent: {error}")
        return str(event.id)
    if not sent:
        print(f"warning: the {event.event} event {event.id} was not sent within {DELIVERY_SECONDS} s")
    return str(event.id)


def event_name(outcome: Outcome) -> str:
    """promoted when the outcome moved `champion`, else not-promoted."""
    return PROMOTED if outcome.alias == CHAMPION else NOT_PROMOTED


def promote_by_hand(name: str, version: str, force: bool = False) -> Outcome:
    """Moves `champion` of `name` to `version`, and of its ONNX flavor to the same run's version,
    through the gate; refuses a version that did not pass the ONNX check, and, unless `force`, one
    from other data than the champion's or less accurate than it."""
    gate_lock.require_shared_prefect()
    chosen = _find_version(name, version)
    version = str(chosen.version)  # "07" is 7
    if chosen.tags.get("onnx_validated") != "true":
        raise PromotionRefusedError(
            f"version {version} of {name!r} has onnx_validated={chosen.tags.get('onnx_validated')!r}, "
            "not 'true': only versions that passed the ONNX parity check can be champion"
        )
    versions = {name: version, **_other_flavors(name, version, chosen.run_id)}
    accuracy = float(chosen.tags.get("test_accuracy", "nan"))
    candidate = Candidate(accuracy, chosen.tags.get("dataset_sha256", "unknown"), True)
    with gate_lock.promotion_gate(name):
        champion = align_champions(list(versions))
        previous = None if champion is None else str(champion.version)
        if previous == version:
            return _outcome(name, versions, f"version {version} is already {CHAMPION}", chosen, previous)
        decision = registry.decide_promotion(candidate, None if champion is None else dict(champion.tags))
        if not decision.promote and not force:
            raise PromotionRefusedError(
                f"version {version} of {name!r}: {decision.reason}; --force moves it anyway"
            )
        reason = f"moved by hand{' with --force' if not decision.promote else ''}: {decision.reason}"
        registry.apply_decision(Decision(True, reason), versions)
        outcome = _outcome(name, versions, reason, chosen, previous)
        if _has_prefect_api():
            announce(outcome)
        else:  # Prefect would start a temporary server just to receive it
            print(f"no PREFECT_API_URL set: the {PROMOTED} event was not sent")
    return outcome


def _outcome(
    name: str, versions: dict[str, str], reason: str, chosen: ModelVersion, previous: Optional[str]
) -> Outcome:
    accuracy = float(chosen.tags.get("test_accuracy", "nan"))
    return Outcome(
        name=name,
        versions=versions,
        alias=CHAMPION,
        reason=reason,
        test_accuracy=None if math.isnan(accuracy) else accuracy,
        run_id=chosen.run_id,
        dataset_sha256=chosen.tags.get("dataset_sha256", "unknown"),
        previous_version=previous,
        by_hand=True,
    )


def _find_version(name: str, version: str) -> ModelVersion:
    """`version` of `name`; PromotionRefusedError naming what exists when there is no such one."""
    client = get_client()
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(model.name for model in client.search_registered_models(max_results=50))
        raise PromotionRefusedError(
            f"no registered model {name!r}; registered models: {', '.join(known) or 'none'}"
        ) from None
    base = name.removesuffix(ONNX_SUFFIX)
    if base != name and _registered(base):
        raise PromotionRefusedError(
            f"{name!r} is the ONNX flavor of {base!r}: give {base!r}, both flavors move together"
        )
    existing = sorted(int(found.version) for found in client.search_model_versions(f"name = {_quoted(name)}"))
    if not version.isdigit() or int(version) not in existing:
        raise PromotionRefusedError(
            f"{name!r} has no version {version!r}; its versions: {', '.join(map(str, existing)) or 'none'}"
        )
    return client.get_model_version(name, str(int(version)))


def _other_flavors(name: str, version: str, run_id: str) -> dict[str, str]:
    """{NAME-onnx: the version run `run_id` registered} when NAME-onnx is a registered model."""
    other = name + ONNX_SUFFIX
    if not _registered(other):
        return {}
    found = registry.version_of_run(other, run_id)
    if found is None:
        raise PromotionRefusedError(
            f"{other!r} has no version from run {run_id} (version {version} of {name!r}); both "
            "flavors' champions must be one run's"
        )
    return {other: found}


def _registered(name: str) -> bool:
    try:
        get_client().get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _quoted(value: str) -> str:
    """`value` as a string literal of an MLflow search filter."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _has_prefect_api() -> bool:
    return bool(get_current_settings().api.url)
