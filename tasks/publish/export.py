"""save_state_dict, export_onnx and validate_onnx: the model leaves PyTorch, checked."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from models import ModelSpec, build_from_spec
from tasks.files import atomic_save

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
MAX_ABS_DIFF = 1e-4


class OnnxMismatchError(RuntimeError):
    """onnxruntime and PyTorch disagree beyond tolerance."""


def load_model(spec: ModelSpec, weights: dict | Path) -> nn.Module:
    """A fresh network from `spec` with a state_dict (or the file holding one) loaded, in eval mode."""
    model = build_from_spec(spec)
    model.load_state_dict(weights if isinstance(weights, dict) else load_weights(weights))
    return model.eval()


def load_weights(path: Path) -> dict:
    """Reads a state_dict without running any pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_state_dict(state_dict: dict, path: Path) -> Path:
    """Saves weights atomically: a crash leaves the previous file or none."""
    atomic_save({key: value.detach().cpu() for key, value in state_dict.items()}, path)
    return path


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Exports with a dynamic batch axis, named input and output, weights inside one file."""
    batch = torch.export.Dim("batch")
    tmp = path.with_name(f".{path.name}.part")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not our concern
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            model.cpu().eval(),
            (example.cpu(),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    samples: int
    single_samples: int
    passed: bool


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """A CPU session: the reference runtime users will most often have."""
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare_onnx(
    model: nn.Module, onnx_path: Path, pixels: torch.Tensor, batch_size: int = 1024, single_samples: int = 32
) -> ParityReport:
    """Runs onnxruntime at batch 1 on a sample and in large batches on all `pixels`, against PyTorch."""
    session = onnx_session(onnx_path)
    batches = [pixels[start : start + batch_size] for start in range(0, len(pixels), batch_size)]
    singles = [pixels[index : index + 1] for index in range(min(single_samples, len(pixels)))]
    worst, agree = 0.0, 0
    with torch.no_grad():
        for chunk in batches + singles:
            expected = model(chunk).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: chunk.numpy()})[0]
            worst = max(worst, float(np.abs(got - expected).max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
    checked = len(pixels) + len(singles)
    passed = worst <= MAX_ABS_DIFF and agree == checked
    return ParityReport(worst, agree / checked, len(pixels), len(singles), passed)
