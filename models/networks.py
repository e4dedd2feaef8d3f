"""Image classifiers that take pixels in [0, 1] and return raw logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.backbones import (
    BACKBONES,
    build_backbone,
    load_backbone_weights,
    pretrained_file,
    pretrained_stats,
)


class Normalize(nn.Module):
    """Standardises pixels per channel, so callers feed plain [0, 1] pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Buffers travel in the state_dict, the ONNX graph and the MLflow model.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """The notes' NeuralNetwork, without the ReLU that clipped its logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class CNN(nn.Module):
    """Two conv blocks and a small head: 91-93% on FashionMNIST in a few CPU epochs."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        height, width = image_size
        self.features = nn.Sequential(_conv_block(in_channels, 32), _conv_block(32, 64))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network before loading its state_dict."""

    name: str
    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    # How images were brought to image_size ("crop", ...): preprocessing travels with the model.
    resize_mode: str = "crop"


_BODIES: dict[str, Callable[[int, tuple[int, int], int], nn.Module]] = {
    "mlp": lambda channels, size, classes: MLP(channels * size[0] * size[1], classes),
    "cnn": CNN,
}
MODEL_NAMES: tuple[str, ...] = (*_BODIES, *BACKBONES)


def build_model(
    name: str,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    mean: tuple[float, ...] = (),
    std: tuple[float, ...] = (),
    weights: str = "none",
) -> nn.Sequential:
    """Builds `name` behind a Normalize layer (mean 0.5, std 0.5 per channel unless given).

    `weights`: "none" (random init), "imagenet" (torchvision's, from the torch hub cache) or the
    path of a torchvision state_dict file; pretrained backbones normalise with ImageNet's stats."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name in BACKBONES:
        body = build_backbone(name, in_channels, tuple(image_size), num_classes)
        if weights != "none":
            load_backbone_weights(body, _weights_path(name, weights))
            mean, std = pretrained_stats(name, in_channels)
    else:
        if weights != "none":
            raise ValueError(f"{name} has no pretrained weights; weights must be 'none', got {weights!r}")
        if min(image_size) < 4 and name == "cnn":
            raise ValueError(f"cnn needs images of at least 4x4 pixels, got {image_size}")
        body = _BODIES[name](in_channels, tuple(image_size), num_classes)
    mean = mean or (0.5,) * in_channels
    std = std or (0.5,) * in_channels
    return nn.Sequential(Normalize(mean, std), body)


def _weights_path(name: str, weights: str) -> Path:
    if weights == "imagenet":
        return pretrained_file(name)
    if not Path(weights).is_file():
        raise ValueError(f"weights must be 'none', 'imagenet' or a state_dict file, got {weights!r}")
    return Path(weights)


def build_from_spec(spec: ModelSpec) -> nn.Sequential:
    """Builds the network a ModelSpec describes (random init: its state_dict is loaded next)."""
    return build_model(spec.name, spec.in_channels, spec.image_size, spec.num_classes, spec.mean, spec.std)
