"""Tracking and reports: MLflow runs, dataset lineage and Prefect artifacts."""
