"""Training checkpoints: written atomically, holding all a retry needs to resume exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.data.loaders import TensorLoader


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: TensorLoader,
    history: list[dict[str, float]],
) -> dict:
    """Everything needed to continue bit-for-bit: weights, optimiser, schedule and RNG streams."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle_rng": loader.generator.get_state(),
    }


def restore_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: TensorLoader,
) -> list[dict[str, float]]:
    """Loads a checkpoint into the given objects and returns the epochs it already holds."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loader.generator.set_state(state["shuffle_rng"])
    return state["history"]
