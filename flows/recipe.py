"""How a TrainConfig becomes a network spec and training settings (no Prefect, no MLflow)."""

from __future__ import annotations

from flows.config import TrainConfig
from models import ModelSpec
from tasks.data.datasets import DatasetRef
from tasks.train.training import TrainSettings


def model_spec(config: TrainConfig, dataset: DatasetRef) -> ModelSpec:
    """The network `config` asks for, shaped for `dataset`."""
    return ModelSpec(
        config.model, dataset.channels, dataset.image_size, dataset.num_classes, dataset.mean, dataset.std
    )


def train_settings(config: TrainConfig) -> TrainSettings:
    return TrainSettings(
        config.epochs,
        config.optimizer,
        config.lr,
        config.weight_decay,
        config.scheduler,
        config.seed,
        precision=config.precision,
        compile=config.compile,
    )
