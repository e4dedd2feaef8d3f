"""The optimisation loop (train, fit, train_one_epoch), checkpointed every epoch so a retry resumes;
tasks.train.steps wraps it as the train-model task."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from models import (
    ModelSpec,
    backbone_parameters,
    build_model,
    freeze_backbone,
    head_parameters,
    keep_frozen_norms_eval,
)
from tasks.data.loaders import Loaders, TensorLoader, epoch_seed
from tasks.train import collectives, speed
from tasks.train.checkpoints import CheckpointFile, Optimisation, checkpoint_state, restore_state
from tasks.train.collectives import Checkpoints

EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, its metrics) once it is checkpointed
BatchCallback = Callable[[int, int], None]  # (epoch, batches done so far in it)
StartCallback = Callable[[speed.Levers], None]  # the levers the built network trains with


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation settings of a run."""

    epochs: int
    optimizer: str
    lr: float
    weight_decay: float
    scheduler: str
    seed: int
    precision: str = "fp32"  # auto, fp32, bf16 or fp16: see speed.resolve_precision
    channels_last: bool = True  # for models with convolutions
    compile: bool = False  # torch.compile the training step
    weights: str = "none"  # backbones: none, imagenet or a state_dict file to start from
    freeze_backbone: bool = False  # train the classifier head only
    backbone_lr_scale: float = 0.1  # the backbone's learning rate as a share of the head's
    sync_batchnorm: bool = True  # with several processes, where torch can (CUDA)


class DeviceUnavailableError(UserError, RuntimeError):
    """The requested device is not present on this machine."""


def resolve_device(requested: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if requested not in available:
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu, cuda or mps")
    if not available[requested]:
        present = ", ".join(name for name, ok in available.items() if ok)
        raise DeviceUnavailableError(
            f"device {requested!r} was requested but is not available here (available: {present})"
        )
    return torch.device(requested)


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """The head at `lr` and a backbone (if any) at `lr * backbone_lr_scale`; frozen parameters left out."""
    groups = [(head_parameters(model), lr), (backbone_parameters(model), lr * backbone_lr_scale)]
    trainable = [([p for p in params if p.requires_grad], rate) for params, rate in groups]
    return [{"params": params, "lr": rate} for params, rate in trainable if params]


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD with Nesterov momentum, over parameter_groups."""
    params = parameter_groups(model, lr, backbone_lr_scale)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adam or sgd")


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule over the whole run: one-cycle, cosine decay or constant, each from the
    learning rate of every parameter group (its peak, for one-cycle)."""
    if name == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]  # each group's own peak
        # A warm-up of exactly one step divides by zero in OneCycleLR (4 steps at 0.25): short runs
        # warm up over two steps; from 8 steps on it is the usual quarter.
        warm_up = max(0.25, 2 / total_steps) if total_steps >= 3 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=total_steps, pct_start=warm_up
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown scheduler {name!r}; choose onecycle, cosine or constant")


def train_one_epoch(
    model: nn.Module,
    loader: TensorLoader,
    optimisation: Optimisation,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss and accuracy (over every rank's share). `on_batch(batch)`
    follows each step, with the number of batches done so far."""
    model.train()
    keep_frozen_norms_eval(model)  # a frozen backbone keeps the statistics it came with
    device = loader.labels.device
    optimizer, scaler = optimisation.optimizer, optimisation.scaler
    world = collectives.world_size()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss, correct
    for step, (images, labels) in enumerate(loader):
        with speed.autocast(device, optimisation.precision):
            logits = model(images)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        # The global batch's mean loss: DDP averages the ranks' gradients, so each rank scales its
        # sum by world / global batch, which stays exact when the last batch splits unevenly.
        loss = loss_sum * (world / loader.step_size(step))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimisation.scheduler.step()
        # Accumulate on the device: a .item() per batch would stall a GPU every step.
        sums += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == labels).sum().double()])
        if on_batch is not None:
            on_batch(step + 1)
    loss_total, correct = collectives.global_sum(sums).tolist()
    return {"loss": loss_total / loader.num_samples, "accuracy": correct / loader.num_samples}


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: TensorLoader, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and labels for every sample of `loader`, in order, on the CPU."""
    model.eval()
    with speed.autocast(loader.labels.device, precision):
        logits, labels = zip(*[(model(images).float().cpu(), targets.cpu()) for images, targets in loader])
    return torch.cat(logits), torch.cat(labels)


def evaluate_loss(model: nn.Module, loader: TensorLoader, precision: str = "fp32") -> dict[str, float]:
    """Mean loss and accuracy of `model` on `loader` (over every rank's share)."""
    logits, labels = predict_logits(model, loader, precision)
    sums = torch.tensor(
        [
            F.cross_entropy(logits, labels, reduction="sum").item(),
            (logits.argmax(1) == labels).sum().item(),
            len(labels),
        ],
        dtype=torch.float64,
        device=loader.labels.device,
    )
    loss, correct, count = collectives.global_sum(sums).tolist()
    return {"loss": loss / count, "accuracy": correct / count}


def settings_levers(model: nn.Module, device: torch.device, settings: TrainSettings) -> speed.Levers:
    """The speed levers `settings` ask for, as they apply to `model` on `device`."""
    return speed.choose_levers(model, device, settings.precision, settings.channels_last, settings.compile)


def fit(
    model: nn.Module,
    loaders: Loaders,
    optimisation: Optimisation,
    epochs: int,
    checkpoints: Checkpoints,
    on_epoch: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    step_model: Optional[nn.Module] = None,
) -> list[dict[str, float]]:
    """Trains for `epochs`, resuming from the checkpoint `checkpoints` holds, saving one every epoch.

    `step_model` runs the training steps (`model` compiled, or wrapped for data-parallel steps);
    checkpoints hold `model`'s weights."""
    step_model = step_model or model
    state = checkpoints.load()
    history = restore_state(state, model, optimisation, checkpoints.origin) if state else []
    for epoch in range(len(history) + 1, epochs + 1):
        loaders.train.set_epoch(epoch)
        torch.manual_seed(epoch_seed(loaders.train.seed, epoch, -1 - collectives.rank()))  # dropout
        started = time.perf_counter()
        step = functools.partial(on_batch, epoch) if on_batch else None
        train = train_one_epoch(step_model, loaders.train, optimisation, step)
        seconds = time.perf_counter() - started
        collectives.broadcast_buffers(model)  # every rank validates what rank 0 saves
        val = evaluate_loss(collectives.unwrap(step_model), loaders.val, optimisation.precision)
        metrics = {
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "epoch_seconds": seconds,
            "samples_per_second": loaders.train.num_samples / seconds,
            "lr": optimisation.optimizer.param_groups[0]["lr"],
        }
        history.append(metrics)
        checkpoints.save(checkpoint_state(model, optimisation, history))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history


def build_training(
    spec: ModelSpec, settings: TrainSettings, device: torch.device, steps_per_epoch: int
) -> tuple[nn.Module, nn.Module, Optimisation]:
    """The network on `device` (channels-last where it has convolutions), the module that runs the
    training steps (compiled when asked) and the optimiser, schedule and loss scaler."""
    model = build_model(
        spec.name, spec.in_channels, spec.image_size, spec.num_classes, spec.mean, spec.std, settings.weights
    ).to(device)
    if settings.freeze_backbone:
        freeze_backbone(model)
    levers = settings_levers(model, device, settings)
    if levers.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        model, settings.optimizer, settings.lr, settings.weight_decay, settings.backbone_lr_scale
    )
    total_steps = settings.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, settings.scheduler, total_steps)
    optimisation = Optimisation(
        optimizer, scheduler, speed.grad_scaler(device, levers.precision), levers.precision
    )
    sync_batchnorm = settings.sync_batchnorm and collectives.sync_batchnorm_runs_on(device)
    step_model = collectives.distribute(model, device, sync_batchnorm)
    return model, torch.compile(step_model) if levers.compile else step_model, optimisation


def train(
    spec: ModelSpec,
    loaders: Loaders,
    settings: TrainSettings,
    checkpoints: Checkpoints | Path,
    on_epoch: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    on_start: Optional[StartCallback] = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Seeds, builds and trains a network (on every rank of a process group, if one is set up);
    returns it with one metrics dict per epoch. `checkpoints`: a file's path, or where ranks share one.

    `on_start(levers)` follows the build, `on_epoch(epoch, metrics)` each checkpointed epoch and
    `on_batch(epoch, batch)` each step."""
    torch.manual_seed(settings.seed)
    checkpoints = CheckpointFile(checkpoints) if isinstance(checkpoints, Path) else checkpoints
    device = loaders.train.labels.device
    model, step_model, optimisation = build_training(spec, settings, device, len(loaders.train))
    if on_start is not None:
        on_start(settings_levers(model, device, settings))
    history = fit(
        model, loaders, optimisation, settings.epochs, checkpoints, on_epoch, on_batch, step_model
    )
    return model, history
