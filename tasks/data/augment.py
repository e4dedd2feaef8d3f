"""Batch augmentation of uint8 images on the training device, seeded from the loader's CPU generator.

The fastai split: images are resized once per item when the dataset is prepared, and augmented
here once per batch, with no per-sample Python. Every random number is drawn on the CPU from the
loader's generator (whose state is checkpointed), so a resumed run sees bit-identical batches.

torchvision.transforms.v2 is not used for the random parts: its transforms draw one parameter
set per call, and its functionals take scalar parameters, so the whole batch would share one crop
and one jitter. One grid_sample over a per-sample grid does every crop (and flip) at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from tasks.data.sources import DataSource

AUGMENT_POLICIES = ("none", "flip", "standard")
_SCALE = (0.35, 1.0)  # crop area as a fraction of the image
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_JITTER = 0.2  # brightness, contrast and saturation factors lie in [1 - _JITTER, 1 + _JITTER]


def resolve_augment(policy: str, source: DataSource, channels: int) -> str:
    """The policy to run: 'auto' is the source's own default for its images of `channels` (standard
    for colour photos, none for digits and the like)."""
    accepted = ("auto", *AUGMENT_POLICIES)
    if policy not in accepted:
        raise ValueError(f"unknown augment policy {policy!r}; choose one of {', '.join(accepted)}")
    return source.default_augment(channels) if policy == "auto" else policy


def augment_batch(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """uint8 (B, C, H, W) on any device -> float32 pixels in [0, 1], augmented per sample."""
    if policy == "none":
        return images.float() / 255  # draws nothing, so unaugmented runs keep their batches
    if policy == "flip":
        flips = torch.rand(len(images), generator=generator) < 0.5
        return flip_some(images, flips)
    if policy == "standard":
        crops, flips, factors = draw_standard(len(images), images.shape[-2:], generator)
        return crop_flip_jitter(images, crops, flips, factors)
    raise ValueError(f"unknown augment policy {policy!r}; choose one of {', '.join(AUGMENT_POLICIES)}")


def flip_some(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1], mirrored left-right where the CPU bool vector `flips` is set."""
    pixels = images.float() / 255  # keeps a channels_last input channels_last
    # indexing only the flipped half beats torch.where over a flipped copy of the whole batch; the
    # mask is on the CPU, so finding its indices never waits for the device
    chosen = flips.nonzero().squeeze(1).to(images.device)
    pixels[chosen] = pixels[chosen].flip(-1)
    return pixels


def draw_standard(
    count: int, size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops (count, 4: left, top, width, height as fractions), flips (count,) and jitter (count, 3)."""
    # one fixed-size draw per batch, whatever the channels, so the stream never depends on data
    uniform = torch.rand(count, 8, generator=generator, dtype=torch.float64)
    height, width = size
    scale = _SCALE[0] + (_SCALE[1] - _SCALE[0]) * uniform[:, 0]
    ratio = torch.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * uniform[:, 1])
    # RandomResizedCrop's pixel sizes w = sqrt(area * ratio), h = sqrt(area / ratio), as fractions,
    # clipped to the image rather than redrawn so the number of draws stays fixed
    crop_w = torch.sqrt(scale * ratio * height / width).clamp(max=1.0)
    crop_h = torch.sqrt(scale / ratio * width / height).clamp(max=1.0)
    left = (1 - crop_w) * uniform[:, 2]
    top = (1 - crop_h) * uniform[:, 3]
    crops = torch.stack([left, top, crop_w, crop_h], dim=1).float()
    flips = uniform[:, 4] < 0.5
    factors = (1 - _JITTER + 2 * _JITTER * uniform[:, 5:8]).float()
    return crops, flips, factors


def crop_grid(
    crops: torch.Tensor, flips: torch.Tensor, size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """grid_sample's (B, H, W, 2) grid on `device` for each crop resized to `size`, maybe mirrored."""
    height, width = size
    left, top, crop_w, crop_h = crops.unbind(dim=1)
    sign = 1 - 2 * flips.to(crops.dtype)
    xs = _axis_coords(left, crop_w * sign, crop_w, width).to(device)
    ys = _axis_coords(top, crop_h, crop_h, height).to(device)
    # the crops are axis-aligned, so x depends only on the column and y only on the row: expanding
    # two small (B, W) and (B, H) tables on the device beats affine_grid and moving a full grid
    return torch.stack((xs[:, None, :].expand(-1, height, -1), ys[:, :, None].expand(-1, -1, width)), -1)


def _axis_coords(start: torch.Tensor, step: torch.Tensor, extent: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) normalised input coordinates along one axis; `step` is the signed crop extent."""
    # normalised coordinates run -1..1 across pixel edges (align_corners=False)
    centres = (2 * torch.arange(size, dtype=start.dtype) + 1) / size - 1
    coords = (2 * start + extent - 1)[:, None] + step[:, None] * centres
    # samples near a crop's edge would blend in pixels beyond it (or padding at the image's edge);
    # held between the crop's outer pixel centres they replicate its edge, as crop-then-resize does
    low = 2 * start - 1 + 1 / size
    high = torch.maximum(low, low + 2 * extent - 2 / size)
    return coords.clamp(low[:, None], high[:, None])


def crop_flip_jitter(
    images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Explicit-parameter core of 'standard': crop and resize back, flip, jitter, clamp to [0, 1]."""
    grid = crop_grid(crops, flips, images.shape[-2:], images.device)
    # crops never exceed the image, so resizing only enlarges and needs no antialiasing
    pixels = F.grid_sample(images.float(), grid, "bilinear", "border", align_corners=False)
    scale, offset = jitter_terms(pixels, factors.to(images.device))
    # grid_sample returns NCHW; writing into a buffer shaped like the input keeps channels_last
    out = torch.addcmul(offset, scale, pixels, out=torch.empty_like(images, dtype=torch.float32))
    return out.clamp_(0, 1)


def jitter_terms(pixels: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) so that offset + scale * pixels is the jittered batch, from 0..255 into 0..1.

    Brightness, contrast and saturation are ColorJitter's per-sample blends (towards black, the
    mean grey and each pixel's grey); all three are linear, so they fold into one pass of
    a * x + (d * grey(x) + e) instead of five over the batch. Only the final result is clamped.
    """
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    colour = pixels.shape[1] == 3
    gray = TF.rgb_to_grayscale(pixels) if colour else pixels
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    scale = brightness * contrast / 255
    offset = (1 - contrast) * brightness / 255 * mean
    if not colour:
        return scale, offset
    return scale * saturation, offset + (scale * (1 - saturation)) * gray
