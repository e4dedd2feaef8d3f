"""Training checkpoints: written atomically, holding all a retry needs to resume exactly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tasks.data.loaders import TensorLoader

if TYPE_CHECKING:
    from tasks.train.training import Optimisation


def checkpoint_state(
    model: nn.Module, optimisation: Optimisation, loader: TensorLoader, history: list[dict[str, float]]
) -> dict:
    """Everything needed to continue bit-for-bit: weights, optimiser, schedule, loss scale and RNG
    streams."""
    return {
        "model": model.state_dict(),
        "optimizer": optimisation.optimizer.state_dict(),
        "scheduler": optimisation.scheduler.state_dict(),
        "scaler": optimisation.scaler.state_dict(),
        "precision": optimisation.precision,
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle_rng": loader.generator.get_state(),
    }


def restore_checkpoint(
    path: Path, model: nn.Module, optimisation: Optimisation, loader: TensorLoader
) -> list[dict[str, float]]:
    """Loads a checkpoint into the given objects and returns the epochs it already holds."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("precision", "fp32")
    if saved != optimisation.precision:
        raise ValueError(
            f"{path} was trained in {saved}, this attempt would continue in {optimisation.precision}; "
            f"resume with --precision {saved}, or start a new run"
        )
    model.load_state_dict(state["model"])
    optimisation.optimizer.load_state_dict(state["optimizer"])
    optimisation.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        optimisation.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loader.generator.set_state(state["shuffle_rng"])
    return state["history"]
