"""Prefect tasks of the prediction flow."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from prefect import task
from prefect.cache_policies import NO_CACHE

from common.path_settings import resolve_path
from common.retrying import retry_except
from tasks.data.csv_images import CsvDatasetError
from tasks.data.sources import MemorySource
from tasks.predict import image_inputs, prediction
from tasks.predict.image_inputs import Inputs
from tasks.predict.prediction import RegisteredModel
from tasks.track import reports, tracking

PathText = Union[str, Path]  # a path as the user gave it: relative ones are to the working directory


@task(
    name="load-registered-model",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_except(image_inputs.PredictionError),  # a missing alias stays missing
    **tracking.MLFLOW_RETRIES,
)
def load_registered_model(
    name: str, alias: str, version: Optional[str] = None, numbered_by: str = ""
) -> RegisteredModel:
    """Resolves `models:/name@alias` (or the version `numbered_by` numbers `version`) to a version,
    checks from its MLmodel alone that it is a model this project writes (else a PredictionError
    naming it, not retried), and reads its input and classes."""
    return prediction.find_registered(name, alias, version, numbered_by)


@task(name="list-images", cache_policy=NO_CACHE)
def list_images(
    input_csv: Optional[PathText],
    image_root: Optional[PathText],
    image_dir: Optional[PathText],
    dataset: Optional[MemorySource],
    data_dir: Path,
    class_names: Sequence[str],
    image_size: Optional[image_inputs.Size] = None,
    max_image_pixels: int = image_inputs.DEFAULT_MAX_PIXELS,
    resize: bool = True,
    partition_size: int = image_inputs.MARK_EVERY,
) -> Inputs:
    """Lists the images to predict (a CSV, a folder, or a dataset's test split, prepared in
    `data_dir`) and checks labels and image headers; paths as the user gave them are made absolute
    here. Without `resize`, image files of another size than `image_size` (the model's) are refused
    here, before any prediction (else they are preprocessed as in training). A CSV's parts of
    `partition_size` rows will each read from their own first row."""
    size = None if resize else image_size
    if input_csv:
        csv_path = resolve_path(input_csv)
        root = resolve_path(image_root) if image_root else csv_path.parent
        inputs = image_inputs.csv_inputs(csv_path, root, class_names, max_image_pixels, size, partition_size)
    elif image_dir:
        inputs = image_inputs.folder_inputs(resolve_path(image_dir), max_image_pixels, size)
        if note := image_inputs.skipped_note(inputs):
            print(note)
    elif dataset is not None:
        inputs = image_inputs.dataset_inputs(dataset, data_dir, class_names)
    else:
        raise image_inputs.PredictionError("no images to predict: give a CSV, a folder or a dataset")
    return inputs


@task(
    name="predict-partition",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_except(image_inputs.PredictionError, CsvDatasetError),  # bad images stay bad
)
def predict_partition(
    registered: RegisteredModel, inputs: Inputs, batch_size: int, output: Path, tracking_uri: str
) -> dict:
    """Predicts one part of the images, wherever the task runner put it, into its own CSV."""
    tracking.use_tracking_uri(tracking_uri)
    model = prediction.load_logits_model(tracking_uri, registered.uri)  # checks the version again
    return prediction.predict_to_csv(model, inputs, registered, batch_size, output)


@task(name="write-predictions", cache_policy=NO_CACHE, **tracking.MLFLOW_RETRIES)
def write_predictions(parts: list[Path], counts: list[dict], output: Path, run_id: str) -> dict:
    """Merges the parts in input order into the predictions CSV and logs it, with accuracy if known;
    returns the metrics and the totals."""
    prediction.merge_csvs(parts, output)
    tracking.log_artifacts(run_id, [output])
    total = prediction.add_tallies(counts)
    metrics = {"images": total["images"]}
    if total["labelled"]:
        metrics["accuracy"] = total["correct"] / total["labelled"]
    tracking.log_metrics(run_id, metrics)
    accuracy = f"; accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics else ""
    print(f"predicted {total['images']} images{accuracy}")
    for part in parts:
        part.unlink()
    return {"predictions": str(output), **metrics, "totals": total}


@task(name="report-predictions", cache_policy=NO_CACHE)
def report_predictions(
    name: str, registered: RegisteredModel, model_uri: str, written: dict, run_id: str
) -> None:
    """The prediction run's summary as a Prefect artifact, keyed by the registered name."""
    reports.publish_prediction_summary(
        name, model_uri, registered.version, written["totals"], written["predictions"], run_id
    )
