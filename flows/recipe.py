"""How a TrainConfig becomes a network spec, training settings and the processes that train (no
Prefect, no MLflow)."""

from __future__ import annotations

import logging

import torch

from common.errors import UserError
from common.path_settings import resolve_path
from flows.config import WEIGHTS, TrainConfig, check_batch
from models import ModelSpec, pretrained_stats
from tasks.data.datasets import DatasetRef, prepare_dataset
from tasks.data.sources import Shape
from tasks.train import torchrun
from tasks.train.launch import DevicesError, resolve_devices
from tasks.train.parallel import Parallel
from tasks.train.speed import usable_cpus
from tasks.train.training import TrainSettings, resolve_device


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


class TorchrunSettingsError(UserError, ValueError):
    """--devices or --train-on set under torchrun, which decides the processes itself."""


def world_size(config: TrainConfig, device: torch.device) -> int:
    """Processes that train, the global batch checked to split over them: torchrun's group when it
    started this one, else --devices (on this machine's `device`, or Ray workers)."""
    world = _world_size(config, device)
    check_batch(config.batch_size, world)
    return world


def _world_size(config: TrainConfig, device: torch.device) -> int:
    if config.train_on == "ray":
        if config.devices == "auto":
            raise DevicesError("--train-on ray takes --devices N, the number of Ray workers, not auto")
        return int(config.devices)  # the cluster's to fit: checked when the training starts there
    if not torchrun.active():
        return resolve_devices(config.devices, device)
    world = torchrun.world_size()
    if config.devices not in ("1", str(world)) or config.train_on != "local":
        raise TorchrunSettingsError(
            f"torchrun started {world} processes: leave out --devices {config.devices} and --train-on "
            f"{config.train_on} (torchrun's --nnodes and --nproc-per-node set them)"
        )
    return world


def flow_device(config: TrainConfig) -> torch.device:
    """Where the flow's own steps run (loaders, evaluation): --device, or with --train-on ray, where
    --device names the Ray workers' device, this machine's best."""
    return resolve_device("auto" if config.train_on == "ray" else config.device)


def parallel_plan(config: TrainConfig, dataset: DatasetRef, device: torch.device) -> Parallel:
    """How the train step spreads the training over processes."""
    train_on = "torchrun" if torchrun.active() else config.train_on
    return Parallel(
        world_size(config, device),
        dataset,
        config.val_fraction,
        train_on,
        config.address,
        config.collective_timeout_seconds,
        config.device,
    )


def follow_rank_0(config: TrainConfig, device: torch.device) -> dict:
    """A torchrun rank other than 0: prepares the data on this machine, then trains its share of
    rank 0's job; rank 0 records the run."""
    logger = logging.getLogger("train_flow")

    def prepare() -> DatasetRef:
        data_dir, workers = resolve_path(config.data_dir), config.prepare_workers or usable_cpus()
        return prepare_dataset(config.dataset, data_dir, logger, data_shape(config), workers)

    history = torchrun.follow(device.type, config.collective_timeout_seconds, prepare)
    return {"epochs": len(history)}
