"""Plain PyTorch image classifiers; no Prefect, no MLflow."""

from models.backbones import (
    BACKBONES,
    MIN_IMAGE_SIZE,
    PretrainedWeightsUnavailable,
    backbone_parameters,
    freeze_backbone,
    head_parameters,
    keep_frozen_norms_eval,
    pretrained_file,
    pretrained_stats,
)
from models.networks import MODEL_NAMES, ModelSpec, build_from_spec, build_model

__all__ = [
    "BACKBONES",
    "MIN_IMAGE_SIZE",
    "MODEL_NAMES",
    "ModelSpec",
    "PretrainedWeightsUnavailable",
    "backbone_parameters",
    "build_from_spec",
    "build_model",
    "freeze_backbone",
    "head_parameters",
    "keep_frozen_norms_eval",
    "pretrained_file",
    "pretrained_stats",
]
