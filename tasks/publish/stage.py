"""The publish stage as one composite of its tasks, for every flow that ends in a trained model
(train_flow's one, sweep_flow's best trial): test, save, export, check, register, report."""

from __future__ import annotations

from pathlib import Path

from tasks.data.datasets import DatasetRef
from tasks.data.loaders import TensorLoader
from tasks.publish.run_summary import report_run
from tasks.publish.steps import (
    evaluate_model,
    export_onnx,
    log_models,
    register_model,
    save_state_dict,
    validate_onnx,
)
from tasks.track.cancellation import CancelWatch
from tasks.train.steps import TrainedModel


def publish_model(
    trained: TrainedModel,
    test: TensorLoader,
    dataset: DatasetRef,
    name: str,
    params: dict,
    run_dir: Path,
    run_id: str,
) -> dict:
    """Tests the trained model, saves it, exports and checks the ONNX, registers both flavors and
    reports the outcome in Prefect."""
    spec = trained.spec
    weights = trained.weights()  # read once; each step builds its own network from it
    # Testing and plotting run beside the ONNX export (mostly Python tracing): two cores, both busy.
    evaluating = evaluate_model.submit(trained, weights, test, dataset.class_names, run_dir, run_id)
    weights_path = save_state_dict(weights, run_dir, run_id)
    onnx_path = export_onnx(spec, weights, run_dir, run_id)
    evaluation = evaluating.result()
    parity = validate_onnx(onnx_path, evaluation, dataset, spec, weights, run_id)
    CancelWatch(interval=0)()  # cancelled while testing or exporting: nothing is registered
    model_ids = log_models(spec, weights, onnx_path, dataset, evaluation, parity, name, run_id)
    registration = register_model(model_ids, spec, dataset, evaluation, parity, params, run_id)
    outputs = {"Outputs": str(run_dir), "Weights": str(weights_path), "ONNX": str(onnx_path)}
    report_run(name, evaluation, parity, registration, outputs)
    return {
        "test_accuracy": evaluation.metrics["test_accuracy"],
        "test_loss": evaluation.metrics["test_loss"],
        "onnx_max_abs_diff": parity["max_abs_diff"],
        **registration,
    }
