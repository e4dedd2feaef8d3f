"""Moving `champion` by hand (flows/promote.py), the repair of flavors left apart, and the promotion
events, read back from a real Prefect server."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from flows import promote
from tasks.data.datasets import DatasetRef
from tasks.publish import promotion, registry
from tasks.publish.evaluation import Evaluation
from tasks.publish.steps import register_model
from tasks.track import tracking
from tests.conftest import REPO

SHA = "a" * 64
PARITY = {"passed": True, "max_abs_diff": 0.0, "samples": 4, "single_samples": 1, "top1_agreement": 1.0}


def registered_run(name: str, accuracy: float, sha: str = SHA, validated: str = "true") -> dict[str, str]:
    """A run whose two flavors are registered as training registers them; {name: version}."""
    client = MlflowClient()
    run_id = tracking.start_run("exp", f"acc {accuracy}", {})
    experiment = client.get_run(run_id).info.experiment_id
    tags = {"test_accuracy": repr(accuracy), "dataset_sha256": sha, "onnx_validated": validated}
    versions = {}
    for registered in (name, name + registry.ONNX_SUFFIX):
        model = client.create_logged_model(experiment, name=registered, source_run_id=run_id)
        versions[registered] = registry.register_version(run_id, model.model_id, registered, tags, "", "")
    return versions


def champions(name: str) -> tuple[str, str]:
    client = MlflowClient()
    names = (name, name + registry.ONNX_SUFFIX)
    return tuple(str(client.get_model_version_by_alias(each, "champion").version) for each in names)


def refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        promote.main(promote.parse_args(argv))
    assert exited.value.code != 0
    return str(exited.value.code)


def promotion_events(name: str, since: datetime, count: int) -> list:
    """The events about registered model `name` since `since`, once the server has stored `count`."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter

    wanted = EventFilter(
        occurred=EventOccurredFilter(since=since),
        resource=EventResourceFilter(id=[promotion.RESOURCE_PREFIX + name]),
    )
    deadline = time.monotonic() + 30  # the server stores events in batches, every few seconds
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(wanted, limit=50)  # the server refuses its client's default, 100
            events = sorted(page.events, key=lambda event: event.occurred)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


@pytest.fixture
def events_here(prefect_server):
    """The session's Prefect server, with this process's events worker started afresh on it (a
    worker made while another test pointed Prefect elsewhere would keep sending there)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    return datetime.now(timezone.utc) - timedelta(seconds=5)


@pytest.mark.slow
def test_help_says_what_force_skips():
    done = subprocess.run(
        [sys.executable, str(REPO / "flows" / "promote.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "dataset_sha256" in done.stdout and "at least as accurate" in done.stdout
    assert "onnx_validated" in done.stdout


@pytest.mark.slow
def test_promote_moves_both_flavors_to_one_run_and_announces_it(mlflow_store, events_here, capsys):
    first = registered_run("hand", 0.9)
    registry.apply_decision(registry.Decision(True, "first"), first)
    second = registered_run("hand", 0.95)
    outcome = promote.main(promote.parse_args(["hand", second["hand"]]))
    assert champions("hand") == (second["hand"], second["hand-onnx"]) == ("2", "2")
    assert outcome["by_hand"] and outcome["previous_version"] == "1"
    assert "hand@champion -> 2, hand-onnx@champion -> 2" in capsys.readouterr().out
    [event] = promotion_events("hand", events_here, 1)
    assert event.event == "image-classifier.model.promoted"
    assert (event.resource.id, event.resource.name) == ("mlflow.registered-model.hand", "hand")
    payload = event.payload
    assert (payload["version"], payload["versions"]) == ("2", {"hand": "2", "hand-onnx": "2"})
    assert (payload["test_accuracy"], payload["dataset_sha256"], payload["alias"]) == (0.95, SHA, "champion")
    assert payload["run_id"] == MlflowClient().get_model_version("hand", "2").run_id
    assert payload["by_hand"] is True and "moved by hand" in payload["reason"]


def test_promote_refuses_what_the_gate_would_and_force_skips_data_and_accuracy(mlflow_store, capsys):
    best = registered_run("m", 0.9)
    registry.apply_decision(registry.Decision(True, "first"), best)
    worse, other_data = registered_run("m", 0.5), registered_run("m", 0.99, sha="b" * 64)
    unchecked = registered_run("m", 0.99, validated="false")
    message = refusal(["m", worse["m"]], capsys)
    assert "below the champion's 0.9000" in message and "--force" in message
    assert "different data" in refusal(["m", other_data["m"]], capsys)
    assert "onnx_validated='false'" in refusal(["m", unchecked["m"], "--force"], capsys)
    assert champions("m") == ("1", "1")
    promote.main(promote.parse_args(["m", other_data["m"], "--force"]))
    assert champions("m") == (other_data["m"], other_data["m-onnx"])
    tags = MlflowClient().get_model_version("m", other_data["m"]).tags
    assert tags["promotion"].startswith("moved by hand with --force: the champion was trained on different")
    promote.main(promote.parse_args(["m", worse["m"], "--force"]))
    assert champions("m") == (worse["m"], worse["m-onnx"])


def test_bad_names_and_versions_are_named_with_what_exists(mlflow_store, capsys):
    registered_run("known", 0.9)
    assert "no registered model 'unknown'; registered models: known, known-onnx" in refusal(
        ["unknown", "1"], capsys
    )
    assert "'known' has no version '7'; its versions: 1" in refusal(["known", "7"], capsys)
    assert "has no version 'one'" in refusal(["known", "one"], capsys)
    assert "ONNX flavor of 'known': give 'known'" in refusal(["known-onnx", "1"], capsys)


def test_a_tracking_server_needs_the_teams_prefect_server(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Refused before the tracking server is asked anything (the check that it answers is the CLI's).
    monkeypatch.setattr("flows.cli.exit_unless_tracking_answers", lambda: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        message = refusal(["m", "1"], capsys)
    assert "no PREFECT_API_URL is set" in message and "PREFECT_API_AUTH_STRING" in message
    assert "s3cret" not in message


@pytest.mark.slow
def test_the_next_gate_repairs_flavors_left_apart_and_announces_a_run_not_promoted(mlflow_store, events_here):
    run_a = registered_run("split", 0.8)
    registry.apply_decision(registry.Decision(True, "a"), run_a)
    run_b = registered_run("split", 0.9)
    # Run B was killed between its two moves: its PyTorch flavor is champion, its ONNX one is not.
    MlflowClient().set_registered_model_alias("split", "champion", run_b["split"])
    assert champions("split") == ("2", "1")
    # The next run, worse than B, passes the gate: B's ONNX version becomes champion too.
    result = registered_run_through_register_model("split", 0.85)
    assert result["alias"] == "challenger" and champions("split") == ("2", "2")
    assert registry.version_of_run("split-onnx", MlflowClient().get_model_version("split", "2").run_id) == "2"
    [event] = promotion_events("split", events_here, 1)
    assert str(event.id) == result["event_id"]
    assert event.event == "image-classifier.model.not-promoted"
    assert event.payload["versions"] == result["versions"] == {"split": "3", "split-onnx": "3"}
    assert (event.payload["alias"], event.payload["previous_version"], event.payload["by_hand"]) == (
        "challenger",
        "2",
        False,
    )


def registered_run_through_register_model(name: str, accuracy: float) -> dict:
    """register_model as a training run calls it, for a run of accuracy `accuracy` with tiny stand-ins
    for what training made (logged models without files)."""
    client = MlflowClient()
    run_id = tracking.start_run("exp", "next", {})
    experiment = client.get_run(run_id).info.experiment_id
    model_ids = {
        registered: client.create_logged_model(experiment, name=registered, source_run_id=run_id).model_id
        for registered in (name, name + registry.ONNX_SUFFIX)
    }
    dataset = DatasetRef(
        "digits", "", SHA, ("0", "1"), 1, (8, 8), 10, 4, (0.5,), (0.5,), "sklearn", "sklearn"
    )
    metrics = {"test_accuracy": accuracy, "test_macro_f1": accuracy, "test_loss": 0.5}
    evaluation = Evaluation(metrics, [], 0, torch.from_numpy(np.zeros((4, 2), np.float32)))
    return register_model.fn(model_ids, None, dataset, evaluation, PARITY, {"val_fraction": 0.25}, run_id)
