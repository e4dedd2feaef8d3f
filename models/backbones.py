"""torchvision backbones: building, pretrained weights (hub cache or a file), fine-tuning groups."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

from common.downloads import download
from common.errors import UserError
from common.redaction import redact_url as redact

BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
# Each network downsamples 32 times before global pooling. ConvNeXt's unpadded stem and downsampling
# convs fail below 32 px; the padded ones run, but their deepest stages would then see only padding.
MIN_IMAGE_SIZE: dict[str, int] = dict.fromkeys(BACKBONES, 32)
# Lets tests (or a local mirror) serve the weight files; the file names stay torchvision's.
WEIGHTS_BASE_URL_ENV = "MODELS_WEIGHTS_BASE_URL"
_TIMEOUT_S = 10  # per connect and per read: an unreachable network fails well within 30 s
WEIGHTS_MAX_BYTES = 512 << 20  # the largest backbone here (convnext_tiny) is about 110 MB
WEIGHTS_DEADLINE_SECONDS = 1800.0  # per file: 110 MB at 60 kB/s
# (classifier Linear, first conv) per architecture, as module paths inside the torchvision network.
_LAYOUTS: dict[type, tuple[str, str]] = {
    tv.ResNet: ("fc", "conv1"),
    tv.MobileNetV3: ("classifier.3", "features.0.0"),
    tv.EfficientNet: ("classifier.1", "features.0.0"),
    tv.ConvNeXt: ("classifier.2", "features.0.0"),
}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable from here."""


def build_backbone(name: str, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """A randomly initialised torchvision network with a fresh `num_classes` head."""
    if in_channels not in (1, 3):
        raise ValueError(f"{name} takes 1 or 3 input channels, got {in_channels}")
    if min(image_size) < MIN_IMAGE_SIZE[name]:
        low = MIN_IMAGE_SIZE[name]
        raise ValueError(f"{name} needs images of at least {low}x{low} pixels, got {tuple(image_size)}")
    # num_classes here gives the head torchvision's own initialisation for that network.
    body = tv.get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 1:
        stem = _layout(body)[1]
        conv = body.get_submodule(stem)
        bias = conv.bias is not None
        grey = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=bias)
        with torch.no_grad():
            # torchvision's stem inits (kaiming fan_out, truncated normal) do not depend on the input
            # channels, so one channel of its 3-channel draw is what it would draw for 1 channel.
            grey.weight.copy_(conv.weight[:, :1])
            if bias:
                grey.bias.copy_(conv.bias)
        body.set_submodule(stem, grey)
    return body


def pretrained_stats(name: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std `name`'s ImageNet weights expect (averaged for 1 channel)."""
    transforms = _weights(name).transforms()
    mean, std = tuple(transforms.mean), tuple(transforms.std)
    if in_channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def load_backbone_weights(body: nn.Module, path: Path) -> None:
    """Loads every tensor but the classifier head's from a torchvision state_dict file, strictly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; all mean "not a state_dict"
        raise ValueError(f"cannot read a state_dict from {path}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    head, stem = (f"{prefix}." for prefix in _layout(body))
    expected = {key: value for key, value in body.state_dict().items() if not key.startswith(head)}
    given = {key: value for key, value in state.items() if not key.startswith(head)}
    stem_weight = given.get(stem + "weight")
    if isinstance(stem_weight, torch.Tensor) and stem_weight.ndim == 4:
        if stem_weight.shape[1] == 3 and expected[stem + "weight"].shape[1] == 1:
            # A grey image is R = G = B, so the RGB filters summed see it as they saw colour.
            given[stem + "weight"] = stem_weight.sum(dim=1, keepdim=True)
    # Older torchvision files lack BatchNorm's batch counters; they are bookkeeping, not weights.
    missing = [key for key in expected if key not in given and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in given if key not in expected]
    if missing or unexpected:
        what = f"lacks backbone key {missing[0]!r}" if missing else f"has unexpected key {unexpected[0]!r}"
        raise ValueError(f"{path} {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, value in given.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: {key!r} is {shape}, the network needs {tuple(expected[key].shape)}")
    body.load_state_dict(given, strict=False)


def pretrained_file(name: str, base_url: str | None = None) -> Path:
    """The cached ImageNet weights file for `name`, downloaded into the torch hub cache if absent.

    Raises PretrainedWeightsUnavailable, saying which file to put where, when it cannot be fetched.
    `base_url` (default: $MODELS_WEIGHTS_BASE_URL, else torchvision's) replaces the URL's folder."""
    official = _weights(name).url
    file_name = official.rsplit("/", 1)[1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / file_name
    if target.is_file():
        return target
    base = base_url or os.environ.get(WEIGHTS_BASE_URL_ENV)
    url = f"{base.rstrip('/')}/{file_name}" if base else official
    try:
        _download(url, target)
    except (OSError, ValueError) as error:  # urllib's errors and timeouts are OSErrors
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for {name} ({file_name}) are not in {folder} and downloading {redact(url)} "
            f"failed: {error}. On a machine with network fetch {official} and copy it, named "
            f"{file_name}, into {folder} (torch hub's checkpoints folder: $TORCH_HOME/hub/checkpoints, "
            "TORCH_HOME defaulting to ~/.cache/torch); or train with weights 'none' or a local file."
        ) from error
    return target


def _download(url: str, target: Path) -> None:
    """Downloads `url` to `target` whole, within the size cap and deadline, checking the hash prefix
    in its name."""
    # torchvision names files <name>-<first hex digits of their sha256>.pth, as torch.hub checks.
    prefix = re.search(r"-([a-f0-9]+)\.", target.name)

    def verify(digest: str) -> None:
        if prefix and not digest.startswith(prefix.group(1)):
            raise ValueError(f"its sha256 {digest} does not start with {prefix.group(1)}")

    download(url, target, WEIGHTS_MAX_BYTES, WEIGHTS_DEADLINE_SECONDS, "sha256", verify, _TIMEOUT_S)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The freshly initialised classifier's parameters; for mlp and cnn, all of them."""
    return _split(model)[0]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything but the classifier head (pretrained when built with weights); empty for mlp, cnn."""
    return _split(model)[1]


def freeze_backbone(model: nn.Module) -> None:
    """Stops gradients to the backbone; pair with keep_frozen_norms_eval after each model.train()."""
    for parameter in backbone_parameters(model):
        parameter.requires_grad_(False)


def keep_frozen_norms_eval(model: nn.Module) -> None:
    """Puts BatchNorm layers whose parameters are all frozen back in eval mode; call after model.train().

    Chosen: a frozen backbone keeps the running statistics it came with. Updating them from small
    fine-tuning batches would shift the features under weights that can no longer adapt. Dropout and
    stochastic depth keep the mode model.train() gave them."""
    for module in model.modules():
        parameters = list(module.parameters(recurse=False))
        if isinstance(module, _NORMS) and parameters and not any(p.requires_grad for p in parameters):
            module.eval()


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    body = next((module for module in model.modules() if isinstance(module, tuple(_LAYOUTS))), None)
    if body is None:
        return list(model.parameters()), []
    head = {id(parameter) for parameter in body.get_submodule(_layout(body)[0]).parameters()}
    parameters = list(model.parameters())
    return [p for p in parameters if id(p) in head], [p for p in parameters if id(p) not in head]


def _layout(body: nn.Module) -> tuple[str, str]:
    return next(layout for kind, layout in _LAYOUTS.items() if isinstance(body, kind))


def _weights(name: str) -> tv.WeightsEnum:
    if name not in BACKBONES:
        raise ValueError(f"{name!r} has no pretrained weights; choose one of {', '.join(BACKBONES)}")
    return tv.get_model_weights(name).DEFAULT
