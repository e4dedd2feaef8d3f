"""Weights and training checkpoints on disk: written atomically, read without running pickled code;
a checkpoint holds all a retry needs to resume exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from common.files import atomic_save
from models import ModelSpec, build_from_spec


@dataclass
class Optimisation:
    """What a training step updates besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16


def load_weights(path: Path) -> dict:
    """Reads a state_dict without running any pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(spec: ModelSpec, weights: dict | Path) -> nn.Module:
    """A fresh network from `spec` with a state_dict (or the file holding one) loaded, in eval mode."""
    model = build_from_spec(spec)
    model.load_state_dict(weights if isinstance(weights, dict) else load_weights(weights))
    return model.eval()


def write_state_dict(state_dict: dict, path: Path) -> Path:
    """Saves weights atomically: a crash leaves the previous file or none, and a failed write raises
    OutputWriteError naming `path`."""
    atomic_save({key: value.detach().cpu() for key, value in state_dict.items()}, path)
    return path


def checkpoint_state(model: nn.Module, optimisation: Optimisation, history: list[dict[str, float]]) -> dict:
    """Everything needed to continue bit-for-bit: weights, optimiser, schedule and loss scale (the
    random streams are seeded per epoch, so they need no saving)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimisation.optimizer.state_dict(),
        "scheduler": optimisation.scheduler.state_dict(),
        "scaler": optimisation.scaler.state_dict(),
        "precision": optimisation.precision,
        "history": history,
    }


def restore_state(
    state: dict, model: nn.Module, optimisation: Optimisation, origin: str
) -> list[dict[str, float]]:
    """Loads a checkpoint's state (read from `origin`) into the given objects; returns its epochs."""
    saved = state.get("precision", "fp32")
    if saved != optimisation.precision:
        raise ValueError(
            f"{origin} was trained in {saved}, this attempt would continue in {optimisation.precision}; "
            f"resume with --precision {saved}, or start a new run"
        )
    model.load_state_dict(state["model"])
    optimisation.optimizer.load_state_dict(state["optimizer"])
    optimisation.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        optimisation.scaler.load_state_dict(state["scaler"])
    return state["history"]


class CheckpointFile:
    """The run's last checkpoint, one file replaced atomically after each epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.origin = str(path)

    def load(self) -> Optional[dict]:
        """The last complete checkpoint, if an earlier attempt wrote one."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.part"):
            stale.unlink()  # left by an attempt killed while writing; the last complete file stands
        return load_weights(self.path) if self.path.exists() else None

    def save(self, state: dict) -> None:
        atomic_save(state, self.path)
