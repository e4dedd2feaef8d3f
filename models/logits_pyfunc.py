"""MLflow pyfunc loader for the ONNX flavor: predict returns the logits array itself.

MLflow's stock ONNX pyfunc answers a numpy input with a {output name: array} dict; this
loader gives both registered flavors the same (N, classes) float32 array. It ships inside
the logged model (code_paths), so it must import nothing from this project.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnxruntime


class OnnxLogits:
    """An onnxruntime session over a single-input, single-output classifier."""

    def __init__(self, model_path: str) -> None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = onnxruntime.InferenceSession(model_path, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, data: Any, params: Optional[dict[str, Any]] = None) -> np.ndarray:
        if isinstance(data, dict):
            data = data[self.input_name]
        pixels = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
        return self.session.run(None, {self.input_name: pixels})[0]


def _load_pyfunc(path: str) -> OnnxLogits:
    return OnnxLogits(path)
