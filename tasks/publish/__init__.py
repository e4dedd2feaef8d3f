"""Evaluation, export and registry: test metrics, plots, ONNX, logged models and versions."""
