"""The pipeline's Prefect tasks: thin wrappers that add retries, names and MLflow logging."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models import ModelSpec
from tasks import evaluation, export, registry, tracking
from tasks.datasets import DatasetRef, prepare_dataset, test_pixels
from tasks.loaders import Loaders, TensorLoader, make_loaders
from tasks.mnist_files import DownloadError
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


@task(name="train-model", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_model(
    spec: ModelSpec, loaders: Loaders, settings: TrainSettings, run_dir: Path, run_id: str
) -> TrainedModel:
    """Trains with per-epoch checkpoints (a retry resumes) and logs every epoch to MLflow."""
    return train_logged(spec, loaders, settings, run_dir, run_id)


def train_logged(
    spec: ModelSpec, loaders: Loaders, settings: TrainSettings, run_dir: Path, run_id: str
) -> TrainedModel:
    """train() with checkpoints in run_dir, each epoch logged to the MLflow run and printed."""
    checkpoint = run_dir / "checkpoints" / "last.pt"

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics(run_id, metrics, step=epoch)
        print(f"epoch {epoch}/{settings.epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    _, history = train(spec, loaders, settings, checkpoint, log_epoch)
    # An attempt that died between checkpointing an epoch and logging it left a gap.
    tracking.log_missing_steps(run_id, history)
    return TrainedModel(spec, str(checkpoint), history)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(
    trained: TrainedModel, test_loader: TensorLoader, class_names: tuple[str, ...], run_dir: Path, run_id: str
) -> dict[str, float]:
    """Test metrics, per-class table and confusion matrix, logged to MLflow."""
    model = export.load_model(trained.spec, trained.weights())
    logits, labels = predict_logits(model.to(test_loader.labels.device), test_loader)
    metrics, table, matrix = evaluation.summarise(logits, labels, class_names)
    table.to_csv(run_dir / "per_class_metrics.csv", index=False)
    plot = evaluation.plot_confusion_matrix(matrix, class_names, run_dir / "confusion_matrix.png")
    tracking.log_metrics(run_id, metrics)
    tracking.log_artifacts(run_id, [run_dir / "per_class_metrics.csv", plot])
    return metrics


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


@task(name="register-model", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def register_model(
    spec: ModelSpec,
    weights_path: Path,
    onnx_path: Path,
    dataset: DatasetRef,
    test_accuracy: float,
    parity: dict,
    name: str,
    run_dir: Path,
    run_id: str,
) -> dict:
    """Logs and registers both flavors, then moves `champion` or `challenger` through the gate."""
    model = export.load_model(spec, weights_path)
    example = test_pixels(dataset, limit=4).numpy()
    signature = registry.pixel_signature(example, spec.num_classes)
    metadata = {
        "class_names": list(dataset.class_names),
        "dataset": dataset.name,
        "dataset_sha256": dataset.sha256,
    }
    saved = run_dir / "mlflow-models"
    flavors = {
        name: registry.save_pytorch_flavor(model, example, signature, metadata, saved / "pytorch-model"),
        name + registry.ONNX_SUFFIX: registry.save_onnx_flavor(
            onnx_path, example, signature, metadata, saved / "onnx-model"
        ),
    }
    tags = {
        "dataset": dataset.name,
        "dataset_sha256": dataset.sha256,
        "test_accuracy": repr(test_accuracy),
        "onnx_max_abs_diff": repr(parity["max_abs_diff"]),
        "onnx_validated": str(parity["passed"]).lower(),
    }
    candidate = registry.Candidate(test_accuracy, dataset.sha256, parity["passed"])
    decision = registry.decide_promotion(candidate, registry.champion_tags(name))
    versions = {reg: registry.register_version(run_id, path, reg, tags) for reg, path in flavors.items()}
    alias = registry.apply_decision(decision, versions)
    print(f"registered {versions} as {alias!r}: {decision.reason}")
    return {"versions": versions, "alias": alias, "reason": decision.reason}
