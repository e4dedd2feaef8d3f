"""Prefect tasks of the prediction flow."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import prediction, tracking
from tasks.prediction import Inputs, RegisteredModel
from tasks.retrying import retry_except


@task(
    name="load-registered-model",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_except(prediction.PredictionError),  # a missing alias stays missing
    **tracking.MLFLOW_RETRIES,
)
def load_registered_model(name: str, alias: str) -> RegisteredModel:
    """Fetches `models:/name@alias` from the registry."""
    return prediction.load_registered(name, alias)


@task(name="read-images", cache_policy=NO_CACHE)
def read_images(
    input_csv: Optional[Path],
    image_root: Optional[Path],
    image_dir: Optional[Path],
    dataset: Optional[str],
    data_dir: Path,
    mirror: Optional[str],
) -> Inputs:
    """Reads the images to predict from a CSV, a folder, or a dataset's test split."""
    if input_csv:
        return prediction.csv_inputs(input_csv, image_root or input_csv.parent)
    if image_dir:
        return prediction.folder_inputs(image_dir)
    return prediction.dataset_inputs(dataset, data_dir, mirror)


@task(name="predict-images", cache_policy=NO_CACHE)
def predict_images(
    registered: RegisteredModel, inputs: Inputs, batch_size: int, output: Path, run_id: str
) -> dict:
    """Predicts, writes the predictions CSV and logs it (and accuracy, when labels are known)."""
    pixels = prediction.to_pixels(inputs, registered.input_shape)
    logits = prediction.predict_logits(registered.model, pixels, batch_size)
    table = prediction.predictions_table(logits, inputs, registered.class_names)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False)
    tracking.log_artifacts(run_id, [output])
    accuracy = prediction.accuracy(table)
    metrics = {"images": len(table), **({"accuracy": accuracy} if accuracy is not None else {})}
    tracking.log_metrics(run_id, metrics)
    print(f"predicted {len(table)} images" + (f"; accuracy {accuracy:.4f}" if accuracy is not None else ""))
    return {"predictions": str(output), **metrics}
