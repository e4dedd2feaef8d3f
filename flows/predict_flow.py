"""Predict images with a registered model, as a Prefect flow that records its own MLflow run.

`python flows/predict_flow.py FLAGS` runs it once, as flows/train_flow.py does its flow."""

from __future__ import annotations

from prefect import flow

from common.path_settings import resolve_path
from flows.cli import parse_config, prepare_servers, user_errors_exit
from flows.config import PredictConfig
from flows.confinement import check_confined
from flows.runners import make_task_runner, running, submit_all
from tasks.predict.image_inputs import partitions
from tasks.predict.steps import (
    list_images,
    load_registered_model,
    predict_partition,
    report_predictions,
    write_predictions,
)
from tasks.track import tracking
from tasks.track.steps import make_run_dir, mlflow_run


@flow(name="predict-images", log_prints=True)
def predict_flow(config: PredictConfig) -> dict:
    """Find the registered model, list the images, predict them in partitions and log the predictions."""
    check_confined(config)
    runner = make_task_runner(config.task_runner, config.address, config.max_parallel)
    registered = load_registered_model(
        config.registry_name, config.alias, config.version, numbered_by=config.registered_model
    )
    size = registered.input_shape[1:]
    inputs = list_images(
        input_csv=config.input_csv,
        image_root=config.image_root,
        image_dir=config.image_dir,
        dataset=config.dataset,
        data_dir=resolve_path(config.data_dir),
        class_names=registered.class_names,
        image_size=size,
        max_image_pixels=config.max_image_pixels,
        resize=config.resize,
        partition_size=config.partition_size,
    )
    run_dir = make_run_dir(resolve_path(config.output_dir))
    pinned = config.version is not None
    uri = registered.uri if pinned else f"models:/{config.registry_name}@{config.alias}"
    link = {
        "model_uri": uri,
        "model_name": config.registry_name,
        "model_version": registered.version,
        "model_flavor": config.flavor,
        "model_source_run_id": registered.source_run_id,
        **({} if pinned else {"model_alias": config.alias}),
        **({"trigger_event": config.trigger_event} if config.trigger_event else {}),
    }
    with mlflow_run(config.experiment, config.model_dump(), "cpu", run_dir, link) as run_id:
        calls = [
            dict(
                registered=registered,
                inputs=part,
                batch_size=config.batch_size,
                output=run_dir / "parts" / f"part-{index:05d}.csv",
                tracking_uri=tracking.tracking_uri(),
            )
            for index, part in enumerate(partitions(inputs, config.partition_size))
        ]
        with running(runner):
            counts = [f.result() for f in submit_all(runner, predict_partition, calls, config.max_parallel)]
        output = resolve_path(config.output) if config.output else run_dir / "predictions.csv"
        written = write_predictions([call["output"] for call in calls], counts, output, run_id)
        report_predictions(config.registry_name, registered, uri, written, run_id)
    result = {key: value for key, value in written.items() if key != "totals"}
    return {"mlflow_run_id": run_id, "model_uri": uri, "model_version": registered.version, **result}


def main(config: PredictConfig) -> dict:
    """The command line's run: the servers are checked first, then the flow runs and its outcome is
    printed in one line; a user error exits with `error: MESSAGE`."""
    with user_errors_exit():
        prepare_servers()
        result = predict_flow(config)
    print(
        f"{result['model_uri']} (version {result['model_version']}): predictions in {result['predictions']}"
    )
    return result


if __name__ == "__main__":
    main(parse_config(config_class=PredictConfig, prog="python flows/predict_flow.py"))
