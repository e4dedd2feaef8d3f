"""prefect.yaml's pull step and predict-batch's trigger, without a server (tests/test_team_deployment.py
deploys them to a real one)."""

from __future__ import annotations

import os

import yaml
from conftest import REPO
from prefect.events import DeploymentEventTrigger

from flows.config import PredictConfig
from flows.pull_steps import start_in_worker_folder
from tasks.publish.promotion import PROMOTED, RESOURCE_PREFIX

DEPLOYMENTS = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_flow_runs_start_in_the_folder_their_worker_started_in(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PWD", str(tmp_path))  # what the worker's shell had
    assert start_in_worker_folder() == {"directory": str(tmp_path)}
    assert os.getcwd() == str(tmp_path)
    [step] = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    assert list(step) == ["flows.pull_steps.start_in_worker_folder"]


def test_predict_batch_follows_the_gates_promotions_of_one_name_with_a_complete_config():
    [spec] = DEPLOYMENTS["predict-batch"]["triggers"]
    trigger = DeploymentEventTrigger.model_validate(spec)
    assert trigger.enabled and trigger.expect == {PROMOTED}
    assert trigger.match.root == {"prefect.resource.id": RESOURCE_PREFIX + "digits-cnn"}
    config = trigger.parameters["config"]
    assert config["registered_model"] == "{{ event.resource.name }}"
    assert (config["version"], config["trigger_event"]) == (
        "{{ event.payload.version }}",
        "{{ event.id | string }}",
    )
    # The trigger's parameters replace the deployment's config whole: rendered, they are a valid one.
    rendered = {
        **config,
        "registered_model": "digits-cnn",
        "version": "3",
        "trigger_event": "0" * 8 + "-0000" * 3 + "-" + "0" * 12,
    }
    assert PredictConfig(**rendered).dataset.name == "digits"
