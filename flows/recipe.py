"""How a TrainConfig becomes a network spec and training settings (no Prefect, no MLflow)."""

from __future__ import annotations

from common.path_settings import resolve_path
from flows.config import WEIGHTS, TrainConfig
from models import ModelSpec, pretrained_stats
from tasks.data.datasets import DatasetRef
from tasks.data.sources import Shape
from tasks.train.training import TrainSettings


def model_spec(config: TrainConfig, dataset: DatasetRef) -> ModelSpec:
    """The network `config` asks for, shaped for `dataset`; pretrained weights bring the
    normalisation they were trained with."""
    mean, std = dataset.mean, dataset.std
    if config.pretrained:
        mean, std = pretrained_stats(config.model, dataset.channels)
    return ModelSpec(
        config.model,
        dataset.channels,
        dataset.image_size,
        dataset.num_classes,
        mean,
        std,
        dataset.resize_mode,
    )


def data_shape(config: TrainConfig) -> Shape:
    """The preprocessing `config` asks for; the default size for images of many sizes suits the
    network (224, ImageNet's, for pretrained backbones)."""
    return Shape(config.channels, config.input_size, config.resize_mode, 224 if config.pretrained else 128)


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
        weights=config.weights if config.weights in WEIGHTS.names else str(resolve_path(config.weights)),
        freeze_backbone=config.freeze_backbone,
        backbone_lr_scale=config.backbone_lr_scale,
        sync_batchnorm=config.sync_batchnorm,
    )
