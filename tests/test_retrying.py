"""Steps that talk to MLflow retry what may pass next time, never what cannot, and are safe to repeat."""

from __future__ import annotations

import errno

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect.context import TaskRunContext
from prefect.states import Failed

from common.files import OutputWriteError
from common.retrying import attempt_stable_ms
from tasks.publish import export, gate_lock, run_summary
from tasks.publish import steps as publish
from tasks.track import steps as track
from tasks.track import tracking
from tasks.track.cancellation import FlowRunCancelled
from tasks.track.delivery import TrackingUnavailableError

MLFLOW_STEPS = [
    track.open_mlflow_run,
    track.log_dataset,
    publish.evaluate_model,
    publish.save_state_dict,
    publish.export_onnx,
    publish.validate_onnx,
    publish.log_models,
    publish.register_model,
    run_summary.report_run,
    track.close_mlflow_run,
]
# A server restarting, a dropped connection: what MLflow's client raises once its own retries are spent.
OUTAGE = MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed")
PERMANENT = [
    OutputWriteError(errno.ENOSPC, "No space left on device", "/out/model.onnx"),
    TrackingUnavailableError("the MLflow tracking server was unreachable for more than 600 s"),
    FlowRunCancelled("cancelled"),
]
ONLY_THERE = {  # errors no retry fixes in one step alone
    publish.validate_onnx: [export.OnnxMismatchError("ONNX disagrees with PyTorch")],
    publish.register_model: [
        gate_lock.GateBusyError("held"),
        gate_lock.GateMisconfiguredError("2 slots"),
        gate_lock.PrefectNotSharedError("a temporary server"),
    ],
}


def retried(step, error: BaseException) -> bool:
    return step.retry_condition_fn(step, None, Failed(data=error))


@pytest.mark.parametrize("step", MLFLOW_STEPS, ids=lambda step: step.name)
def test_every_mlflow_step_retries_an_outage_with_backoff_and_never_what_cannot_pass(step):
    assert step.retries == 3 and step.retry_delay_seconds == [2, 5, 10] and step.retry_jitter_factor == 0.5
    assert retried(step, OUTAGE) and retried(step, ConnectionError("reset by peer"))
    for error in PERMANENT + ONLY_THERE.get(step, []):
        assert not retried(step, error), error


def test_outside_a_task_run_the_stable_timestamp_is_now():
    before = tracking.now_ms()
    assert before <= attempt_stable_ms() <= tracking.now_ms()


# Each of these steps has its first MLflow request go through and then lose its answer, the worst
# case for a retry: whatever that request did is done, and the step runs again from the start.
FLAKY_STEPS = {"evaluate-model", "save-state-dict", "export-onnx", "validate-onnx", "report-run"}


class LosesFirstAnswer:
    """An MlflowClient whose first call within each step of FLAKY_STEPS is made, then raises OUTAGE."""

    def __init__(self, client: MlflowClient, step: str, dropped: dict[str, str]) -> None:
        self._client, self._step, self._dropped = client, step, dropped

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            if self._step not in self._dropped:
                self._dropped[self._step] = name
                raise OUTAGE
            return result

        return call


@pytest.mark.slow
def test_one_lost_answer_in_each_step_is_retried_and_the_run_completes_logging_everything_once(
    prefect_server, mlflow_store, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.config import TrainConfig
    from flows.train_flow import train_flow

    real_client, dropped = tracking.get_client, {}

    def flaky_client():
        context = TaskRunContext.get()
        step = context.task.name if context else None
        if step in FLAKY_STEPS and step not in dropped:
            return LosesFirstAnswer(real_client(), step, dropped)
        return real_client()

    monkeypatch.setattr(tracking, "get_client", flaky_client)
    for step in MLFLOW_STEPS:
        monkeypatch.setattr(step, "retry_delay_seconds", [0.1])  # the backoff is tested above
    config = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=1,
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "outputs"),
        experiment="flaky",
        system_metrics=False,
    )
    result = train_flow(config)

    assert dropped == {
        "evaluate-model": "log_batch",
        "save-state-dict": "log_artifact",
        "export-onnx": "log_artifact",
        "validate-onnx": "log_batch",
        "report-run": "get_run",
    }
    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and result["alias"] == "champion"
    for metric in ("test_accuracy", "test_macro_f1", "onnx_max_abs_diff", "onnx_top1_agreement"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 1, metric  # logged again, kept once
    logged = [artefact.path for artefact in client.list_artifacts(run.info.run_id)]
    assert len(logged) == len(set(logged)) and {"model.onnx", "model_weights.pth", "test_logits.npy"} <= set(
        logged
    )
    assert [str(v.version) for v in client.search_model_versions("name = 'synthetic-mlp'")] == ["1"]
    with get_client(sync_client=True) as prefect:
        [flow_run] = prefect.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.data.tags["prefect.flow_run_id"]]))
        )
        attempts = {
            task_run.name.rsplit("-", 1)[0]: task_run.run_count
            for task_run in prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
        }
    assert flow_run.state.is_completed()
    assert {step: attempts[step] for step in FLAKY_STEPS} == dict.fromkeys(FLAKY_STEPS, 2)
