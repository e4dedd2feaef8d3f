"""Prefect tasks of the publishing stage: evaluate, save, export and check ONNX, log the models
and register them through the promotion gate."""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from common.files import atomic_output, atomic_path
from common.retrying import attempt_stable_ms
from models import ModelSpec
from tasks.data.datasets import DatasetRef, test_images, test_pixels
from tasks.data.loaders import TensorLoader
from tasks.publish import evaluation, export, gate_lock, model_card, plots, promotion, registry
from tasks.publish.evaluation import Evaluation
from tasks.track import lineage, reports, tracking
from tasks.track.retries import mlflow_retries
from tasks.train import checkpoints, speed
from tasks.train.steps import TrainedModel
from tasks.train.training import predict_logits


@task(name="evaluate-model", cache_policy=NO_CACHE, **mlflow_retries())
def evaluate_model(
    trained: TrainedModel,
    weights: dict,
    test_loader: TensorLoader,
    class_names: tuple[str, ...],
    run_dir: Path,
    run_id: str,
) -> Evaluation:
    """Test metrics, per-class table and plots (confusion matrix, learning curves, misclassified
    images) of the trained network with `weights`, logged to MLflow."""
    model = checkpoints.load_model(trained.spec, weights).to(test_loader.labels.device)
    if speed.has_convolutions(model):  # the same fp32 arithmetic, laid out for speed
        model = model.to(memory_format=torch.channels_last)
    logits, labels = predict_logits(model, test_loader)
    metrics, table, matrix = evaluation.summarise(logits, labels, class_names)
    with atomic_output(run_dir / "per_class_metrics.csv") as handle:
        table.to_csv(handle, index=False)
    with atomic_path(run_dir / "test_logits.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, logits.numpy())  # per test image, in the split's order
    images = test_loader.images.cpu()
    artefacts = [
        run_dir / "per_class_metrics.csv",
        run_dir / "test_logits.npy",
        plots.plot_confusion_matrix(matrix, class_names, run_dir / "confusion_matrix.png"),
        plots.plot_learning_curves(trained.history, run_dir / "learning_curves.png"),
        plots.plot_misclassified(
            images, labels, logits.argmax(1), class_names, run_dir / "misclassified.png"
        ),
    ]
    logged_at = attempt_stable_ms()  # a retry's metrics are the first attempt's, stored once
    tracking.log_metrics(run_id, metrics, timestamp=logged_at)
    tracking.log_artifacts(run_id, artefacts)
    return Evaluation(metrics, table.to_dict("records"), logged_at, logits)


@task(name="save-state-dict", cache_policy=NO_CACHE, **mlflow_retries())
def save_state_dict(weights: dict, run_dir: Path, run_id: str) -> Path:
    """Writes model_weights.pth atomically and logs it."""
    path = checkpoints.write_state_dict(weights, run_dir / "model_weights.pth")
    tracking.log_artifacts(run_id, [path])
    return path


@task(name="export-onnx", cache_policy=NO_CACHE, **mlflow_retries())
def export_onnx(spec: ModelSpec, weights: dict, run_dir: Path, run_id: str) -> Path:
    """Exports model.onnx with a dynamic batch axis and logs it."""
    model = checkpoints.load_model(spec, weights)
    example = torch.rand(2, spec.in_channels, *spec.image_size)
    path = export.write_onnx(model, example, run_dir / "model.onnx")
    tracking.log_artifacts(run_id, [path])
    return path


@task(name="validate-onnx", cache_policy=NO_CACHE, **mlflow_retries(export.OnnxMismatchError))
def validate_onnx(
    onnx_path: Path, evaluation: Evaluation, dataset: DatasetRef, spec: ModelSpec, weights: dict, run_id: str
) -> dict:
    """onnxruntime against PyTorch's test logits on the whole test split; raises when they disagree
    beyond 1e-4, or, for a network whose own fp32 rounding is larger, beyond what that allows."""
    images = test_images(dataset)
    report = export.compare_onnx(evaluation.logits, onnx_path, images)
    if not report.passed and report.top1_agreement == 1:
        model = checkpoints.load_model(spec, weights)
        tolerance = export.fp32_tolerance(model, images, evaluation.logits, report.worst_rows)
        report = replace(report, tolerance=tolerance, passed=report.max_abs_diff <= tolerance)
    tracking.log_metrics(
        run_id,
        {
            "onnx_max_abs_diff": report.max_abs_diff,
            "onnx_tolerance": report.tolerance,
            "onnx_top1_agreement": report.top1_agreement,
        },
        timestamp=attempt_stable_ms(),
    )
    if not report.passed:
        raise export.OnnxMismatchError(
            f"ONNX disagrees with PyTorch: max |diff| {report.max_abs_diff:.3g} "
            f"(limit {report.tolerance:.3g}), top-1 agreement {report.top1_agreement:.6f} (must be 1); "
            "nothing will be registered"
        )
    return {key: value for key, value in asdict(report).items() if key != "worst_rows"}


@task(name="log-models", cache_policy=NO_CACHE, **mlflow_retries())
def log_models(
    spec: ModelSpec,
    weights: dict,
    onnx_path: Path,
    dataset: DatasetRef,
    evaluation: Evaluation,
    parity: dict,
    name: str,
    run_id: str,
) -> dict[str, str]:
    """Logs both flavors as logged models of the run, with the test metrics; returns their ids by
    registry name. A retry reuses what an earlier attempt logged."""
    example = test_pixels(dataset, limit=4).numpy()
    options = dict(
        signature=registry.pixel_signature(example, spec.num_classes),
        input_example=example,
        metadata={
            "class_names": list(dataset.class_names),
            "dataset": dataset.name,
            "dataset_sha256": dataset.sha256,
            "preprocessing": dataset.preprocessing.to_dict(),  # prediction and serving apply it
        },
    )
    savers = {
        name: functools.partial(registry.save_pytorch, checkpoints.load_model(spec, weights), **options),
        name + registry.ONNX_SUFFIX: functools.partial(registry.save_onnx_logits, onnx_path, **options),
    }
    tags = model_tags(dataset, evaluation, parity)
    model_ids = {}
    for registered, save in savers.items():
        model_ids[registered] = registry.log_model_once(run_id, registered, tags, save)
        tracking.log_metrics(
            run_id, evaluation.metrics, model_id=model_ids[registered], timestamp=evaluation.logged_at
        )
    return model_ids


@task(
    name="register-model",
    cache_policy=NO_CACHE,
    # A gate that refused, or stayed busy for minutes, would do the same again.
    **mlflow_retries(
        gate_lock.GateBusyError, gate_lock.GateMisconfiguredError, gate_lock.PrefectNotSharedError
    ),
)
def register_model(
    model_ids: dict[str, str],
    spec: ModelSpec,
    dataset: DatasetRef,
    evaluation: Evaluation,
    parity: dict,
    params: dict,
    run_id: str,
) -> dict:
    """Registers the logged models with a model card, then moves `champion` (or `challenger`) of
    both names through the gate, which the first name's champion decides; one run at a time. The
    outcome is announced as a Prefect event (tasks/publish/promotion.py)."""
    name = next(iter(model_ids))
    with gate_lock.promotion_gate(name):
        champion = promotion.align_champions(list(model_ids))  # a run killed between its moves
        candidate = registry.Candidate(evaluation.metrics["test_accuracy"], dataset.sha256, parity["passed"])
        decision = registry.decide_promotion(candidate, None if champion is None else dict(champion.tags))
        verdict = f"{registry.CHAMPION if decision.promote else registry.CHALLENGER}: {decision.reason}"
        sizes = lineage.split_sizes(dataset, float(params["val_fraction"]))
        facts = (evaluation.metrics, evaluation.per_class, parity, verdict, reports.provenance(run_id))
        card = model_card.version_card(dataset, sizes, params, *facts)
        contract = model_card.model_contract(dataset.preprocessing, dataset.class_names)
        tags = model_tags(dataset, evaluation, parity)
        versions = {
            registered: registry.register_version(run_id, model_id, registered, tags, card, contract)
            for registered, model_id in model_ids.items()
        }
        alias = registry.apply_decision(decision, versions)
        previous = None if champion is None else str(champion.version)
        outcome = promotion.Outcome(
            name, versions, alias, decision.reason, candidate.test_accuracy, run_id, dataset.sha256, previous
        )
        event_id = promotion.announce(outcome)  # in the gate: events leave in the order of the moves
    print(f"registered {versions} as {alias!r}: {decision.reason}")
    return {
        "versions": versions,
        "model_ids": model_ids,
        "alias": alias,
        "reason": decision.reason,
        "run_id": run_id,
        "event_id": event_id,
    }


def model_tags(dataset: DatasetRef, evaluation: Evaluation, parity: dict) -> dict[str, str]:
    """What the gate and registry users read off a logged model or version."""
    return {
        "dataset": dataset.name,
        "dataset_sha256": dataset.sha256,
        "test_accuracy": repr(evaluation.metrics["test_accuracy"]),
        "onnx_max_abs_diff": repr(parity["max_abs_diff"]),
        "onnx_validated": str(parity["passed"]).lower(),
    }
