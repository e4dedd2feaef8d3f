"""Speed levers picked for the hardware at run time: mixed precision, channels-last memory, threads."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from torch import nn

from common.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionUnavailableError(UserError, RuntimeError):
    """The requested precision cannot run on the training device."""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions and matmuls in hardware. Elsewhere bf16 is emulated and
    slower than fp32."""
    # torch.cpu.get_capabilities() is public in recent torch (2.14 has it); an older one without it
    # says no: auto picks fp32, and bf16 can still be asked for. torch.backends.cpu's
    # get_cpu_capability() ("AVX512") cannot tell AVX512 with BF16 from AVX512 without it.
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_tile"))


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is bf16 where the device computes it natively (such CPUs, CUDA GPUs from Ampere on),
    else fp32; fp16 needs CUDA, where a gradient scaler keeps small gradients from vanishing."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type != "cuda":
        raise PrecisionUnavailableError(
            f"precision 'fp16' needs a CUDA device, and this run trains on {device.type}; "
            "choose auto, fp32 or bf16"
        )
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Forward passes in `precision` (weights and optimiser state stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16; for other precisions a disabled one that passes steps through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def has_convolutions(model: nn.Module) -> bool:
    """Convolutions run faster on channels-last (NHWC) memory, on CPU (oneDNN) and CUDA (cuDNN)."""
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


@dataclass(frozen=True)
class Levers:
    """How a model trains on a device: its arithmetic, memory layout and compilation."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool
    compile: bool

    def tags(self) -> dict[str, str]:
        return {
            "precision": self.precision,
            "channels_last": str(self.channels_last).lower(),
            "compile": str(self.compile).lower(),
        }


def choose_levers(
    model: nn.Module, device: torch.device, precision: str, channels_last: bool, compile: bool
) -> Levers:
    """The levers for `model` on `device`: precision resolved, channels-last only where it has
    convolutions."""
    return Levers(resolve_precision(precision, device), channels_last and has_convolutions(model), compile)


def usable_cpus() -> int:
    """The logical CPUs this process may run on (its affinity on Linux), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may run on: more threads than that only contend."""
    import psutil

    usable = usable_cpus()
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def set_threads(threads: Optional[int]) -> int:
    """Sets torch's intra-op threads (default: one per physical core) and returns the number."""
    count = threads or physical_cores()
    torch.set_num_threads(count)
    return count
