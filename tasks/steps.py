"""The pipeline's Prefect tasks: thin wrappers that add retries, names and MLflow logging."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from rich.console import Console

from models import ModelSpec
from tasks import evaluation, export, lineage, model_card, plots, registry, reports, tracking
from tasks.datasets import DatasetRef, prepare_dataset, test_pixels
from tasks.evaluation import Evaluation
from tasks.loaders import Loaders, TensorLoader, make_loaders
from tasks.mnist_files import DownloadError
from tasks.progress import TrainingProgress
from tasks.retrying import retry_on
from tasks.training import TrainSettings, predict_logits, train


@dataclass(frozen=True)
class TrainedModel:
    spec: ModelSpec
    checkpoint_path: str
    history: list[dict[str, float]]

    def weights(self) -> dict:
        """The trained state_dict, read from the last checkpoint."""
        return export.load_weights(Path(self.checkpoint_path))["model"]


@task(
    name="fetch-dataset",
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on(DownloadError),  # a bad checksum or CSV will not fix itself
    cache_policy=NO_CACHE,
)
def fetch_dataset(name: str, data_dir: Path, **options) -> DatasetRef:
    """Fetches the dataset and stores it as uint8 tensors for the loaders."""
    return prepare_dataset(name, data_dir, **options)


@task(name="build-loaders", cache_policy=NO_CACHE)
def build_loaders(
    dataset: DatasetRef, batch_size: int, val_fraction: float, seed: int, device: str
) -> Loaders:
    """Builds the run's train/validation/test loaders; they stay in this process."""
    return make_loaders(dataset, batch_size, val_fraction, seed, device)


@dataclass(frozen=True)
class Watch:
    """How a training run is watched besides its per-epoch metrics."""

    system_metrics: bool = False  # MLflow system/* metrics while training
    progress_key: Optional[str] = None  # Prefect progress artifact key
    console: bool = False  # a progress bar within each epoch (for a terminal)


@task(name="train-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_model(
    spec: ModelSpec, loaders: Loaders, settings: TrainSettings, run_dir: Path, run_id: str, watch: Watch
) -> TrainedModel:
    """Trains with per-epoch checkpoints (a retry resumes) and logs every epoch to MLflow."""
    return train_logged(spec, loaders, settings, run_dir, run_id, watch)


def train_logged(
    spec: ModelSpec,
    loaders: Loaders,
    settings: TrainSettings,
    run_dir: Path,
    run_id: str,
    watch: Watch = Watch(),
) -> TrainedModel:
    """train() with checkpoints in run_dir, each epoch logged to the MLflow run and printed."""
    checkpoint = run_dir / "checkpoints" / "last.pt"
    console = Console() if watch.console else None
    progress = TrainingProgress(settings.epochs, len(loaders.train), watch.progress_key, console)

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(run_id, metrics, step=epoch)
        progress.epoch_done(epoch)
        print(f"epoch {epoch}/{settings.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    with tracking.system_metrics(run_id, watch.system_metrics), progress:
        _, history = train(spec, loaders, settings, checkpoint, log_epoch, progress.batch_done)
    # An attempt that died between checkpointing an epoch and logging it left a gap.
    tracking.log_missing_steps(run_id, history)
    return TrainedModel(spec, str(checkpoint), history)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(
    trained: TrainedModel, test_loader: TensorLoader, class_names: tuple[str, ...], run_dir: Path, run_id: str
) -> Evaluation:
    """Test metrics, per-class table and plots (confusion matrix, learning curves, misclassified
    images), logged to MLflow."""
    model = export.load_model(trained.spec, trained.weights())
    logits, labels = predict_logits(model.to(test_loader.labels.device), test_loader)
    metrics, table, matrix = evaluation.summarise(logits, labels, class_names)
    table.to_csv(run_dir / "per_class_metrics.csv", index=False)
    images = test_loader.images.cpu()
    artefacts = [
        run_dir / "per_class_metrics.csv",
        plots.plot_confusion_matrix(matrix, class_names, run_dir / "confusion_matrix.png"),
        plots.plot_learning_curves(trained.history, run_dir / "learning_curves.png"),
        plots.plot_misclassified(
            images, labels, logits.argmax(1), class_names, run_dir / "misclassified.png"
        ),
    ]
    logged_at = tracking.now_ms()
    tracking.log_metrics(run_id, metrics, timestamp=logged_at)
    tracking.log_artifacts(run_id, artefacts)
    return Evaluation(metrics, table.to_dict("records"), logged_at)


@task(name="save-state-dict", cache_policy=NO_CACHE)
def save_state_dict(trained: TrainedModel, run_dir: Path, run_id: str) -> Path:
    """Writes model_weights.pth atomically and logs it."""
    path = export.write_state_dict(trained.weights(), run_dir / "model_weights.pth")
    tracking.log_artifacts(run_id, [path])
    return path


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_onnx(spec: ModelSpec, weights_path: Path, run_dir: Path, run_id: str) -> Path:
    """Exports model.onnx with a dynamic batch axis and logs it."""
    model = export.load_model(spec, weights_path)
    example = torch.rand(2, spec.in_channels, *spec.image_size)
    path = export.write_onnx(model, example, run_dir / "model.onnx")
    tracking.log_artifacts(run_id, [path])
    return path


@task(name="validate-onnx", cache_policy=NO_CACHE)
def validate_onnx(
    spec: ModelSpec, weights_path: Path, onnx_path: Path, dataset: DatasetRef, run_id: str
) -> dict:
    """onnxruntime against PyTorch on the whole test split; raises when they disagree."""
    model = export.load_model(spec, weights_path)
    report = export.compare_onnx(model, onnx_path, test_pixels(dataset))
    tracking.log_metrics(
        run_id, {"onnx_max_abs_diff": report.max_abs_diff, "onnx_top1_agreement": report.top1_agreement}
    )
    if not report.passed:
        raise export.OnnxMismatchError(
            f"ONNX disagrees with PyTorch: max |diff| {report.max_abs_diff:.3g} "
            f"(limit {export.MAX_ABS_DIFF}), top-1 agreement {report.top1_agreement:.6f} (must be 1); "
            "nothing will be registered"
        )
    return asdict(report)


@task(name="log-models", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def log_models(
    spec: ModelSpec,
    weights_path: Path,
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
        },
    )
    savers = {
        name: functools.partial(registry.save_pytorch, export.load_model(spec, weights_path), **options),
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


@task(name="register-model", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
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
    both names through the gate, which the first name's champion decides."""
    name = next(iter(model_ids))
    candidate = registry.Candidate(evaluation.metrics["test_accuracy"], dataset.sha256, parity["passed"])
    decision = registry.decide_promotion(candidate, registry.champion_tags(name))
    outcome = f"{registry.CHAMPION if decision.promote else registry.CHALLENGER}: {decision.reason}"
    sizes = lineage.split_sizes(dataset, float(params["val_fraction"]))
    facts = (evaluation.metrics, evaluation.per_class, parity, outcome, reports.provenance(run_id))
    card = model_card.version_card(dataset, sizes, params, *facts)
    contract = model_card.model_contract(spec.in_channels, spec.image_size, dataset.class_names)
    tags = model_tags(dataset, evaluation, parity)
    versions = {
        registered: registry.register_version(run_id, model_id, registered, tags, card, contract)
        for registered, model_id in model_ids.items()
    }
    alias = registry.apply_decision(decision, versions)
    print(f"registered {versions} as {alias!r}: {decision.reason}")
    return {
        "versions": versions,
        "model_ids": model_ids,
        "alias": alias,
        "reason": decision.reason,
        "run_id": run_id,
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


@task(name="report-run", cache_policy=NO_CACHE)
def report_run(
    name: str, evaluation: Evaluation, parity: dict, registration: dict, outputs: dict[str, str]
) -> None:
    """The run's summary and per-class table as Prefect artifacts, keyed by the registered name."""
    reports.publish_run_summary(name, evaluation, parity, registration, outputs)
