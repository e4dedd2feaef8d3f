"""The model leaves PyTorch, checked: write_onnx exports it, compare_onnx measures the ONNX model
against it within fp32_tolerance (tasks.publish.steps wraps them as export-onnx and validate-onnx)."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime
import torch
from torch import nn

from common.errors import UserError
from common.files import atomic_path

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
MAX_ABS_DIFF = 1e-4
_EXACT_ROWS = 64  # images the float64 reference is computed for (the most different ones)
_EXACT_BATCH = 8
_BATCH_PIXELS = 1 << 22  # values per onnxruntime batch: 1024 28x28 images, 27 RGB ones at 224x224


class OnnxMismatchError(UserError, RuntimeError):
    """onnxruntime and PyTorch disagree beyond tolerance."""


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Exports with a dynamic batch axis, named input and output, weights inside one file; written
    atomically, and a failed write raises OutputWriteError naming `path`."""
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not our concern
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # The TorchScript exporter (dynamo=False) writes the same graph for these networks (8
        # operators for the MLP, 12 for the CNN) in 0.1-0.2 s; the dynamo exporter takes 4-5 s in a
        # fresh process (torch.export, then onnxscript's import, translation and optimiser).
        # Either way the parity gate checks the file against PyTorch before anything is registered.
        torch.onnx.export(
            model.cpu().eval(),
            (example.cpu(),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
            verbose=False,
        )
    return path


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    samples: int
    single_samples: int
    passed: bool
    tolerance: float = MAX_ABS_DIFF  # the bound max_abs_diff is held to (see fp32_tolerance)
    worst_rows: tuple[int, ...] = ()  # the images whose logits differ most, worst first


def onnx_session(path: Path, arena: bool = True) -> onnxruntime.InferenceSession:
    """A CPU session: the reference runtime users will most often have. Without `arena`, memory
    goes back after each run (onnxruntime's arena keeps the largest activations it ever held)."""
    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = arena
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_onnx(
    expected: torch.Tensor,
    onnx_path: Path,
    images: torch.Tensor,
    batch_size: int = 1024,
    single_samples: int = 32,
) -> ParityReport:
    """Runs onnxruntime in batches on all `images` (uint8, scaled to [0, 1] a batch at a time, so a
    memory-mapped split is never held whole as floats), and at batch 1 on a sample, against
    PyTorch's fp32 logits `expected` for the same pixels.

    Every image goes through the batched graph, so every input the test split holds is checked.
    Batch 1 is another shape through the same graph (onnxruntime may pick other kernels for it,
    but not other weights or operators); a sample shows that path agrees, and checking every image
    that way would cost seconds per run for no new kind of error."""
    session = onnx_session(onnx_path, arena=False)  # one pass; then the memory is not needed
    singles = min(single_samples, len(images))
    batch_size = max(1, min(batch_size, _BATCH_PIXELS // max(1, images[0].numel())))
    starts = range(0, len(images), batch_size)
    chunks = [(images[s : s + batch_size], expected[s : s + batch_size]) for s in starts]
    chunks += [(images[i : i + 1], expected[i : i + 1]) for i in range(singles)]
    row_diffs, agree = [], 0
    for chunk, reference in chunks:
        pixels = chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
        reference = reference.numpy()
        row_diffs.append(np.abs(got - reference).max(axis=1))
        agree += int((got.argmax(1) == reference.argmax(1)).sum())
    diffs = np.concatenate(row_diffs)
    checked = len(images) + singles
    worst = float(diffs.max())
    passed = worst <= MAX_ABS_DIFF and agree == checked
    rows = np.argsort(-diffs[: len(images)], kind="stable")[:_EXACT_ROWS]
    return ParityReport(worst, agree / checked, len(images), singles, passed, worst_rows=tuple(rows.tolist()))


def fp32_tolerance(
    model: nn.Module, images: torch.Tensor, expected: torch.Tensor, rows: Sequence[int]
) -> float:
    """MAX_ABS_DIFF plus twice PyTorch's own fp32 error (against float64) on `rows`.

    Deep networks (resnet50, efficientnet_b0) accumulate more fp32 rounding than 1e-4 in their
    logits: PyTorch's fp32 logits differ from float64 ones by 1.5e-4 to 5e-3 there (benchmarks:
    tests/test_backbones.py). An exporter that is as exact as PyTorch's fp32 may then differ from it
    by up to twice that, and no more, so that bound still catches a wrong graph or weight."""
    exact, error = copy.deepcopy(model).cpu().double().eval(), 0.0
    for start in range(0, len(rows), _EXACT_BATCH):  # small batches: float64 activations are large
        index = torch.as_tensor(list(rows[start : start + _EXACT_BATCH]), dtype=torch.long)
        pixels = images[index].double() / (255 if images.dtype == torch.uint8 else 1)
        with torch.no_grad():
            error = max(error, (exact(pixels) - expected[index].double()).abs().max().item())
    return MAX_ABS_DIFF + 2 * error
