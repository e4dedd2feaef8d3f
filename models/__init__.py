"""Plain PyTorch image classifiers; no Prefect, no MLflow."""

from models.networks import MODEL_NAMES, ModelSpec, build_from_spec, build_model

__all__ = ["MODEL_NAMES", "ModelSpec", "build_from_spec", "build_model"]
