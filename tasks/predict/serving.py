"""A request body for MLflow's scoring server from image files:

    python -m tasks.predict.serving "models:/NAME-onnx@champion" shirt.png boot.png > request.json

prints {"inputs": float32 pixels in [0, 1], shaped as the model's signature says}, which
`curl -d @request.json http://HOST:PORT/invocations` posts to `mlflow models serve`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlflow

from tasks.data.decoding import load_image
from tasks.data.images import ImageFileError, check_image_file
from tasks.predict import model_files
from tasks.predict.image_inputs import PredictionError
from tasks.predict.prediction import to_pixels


def request_body(model_uri: str, paths: Sequence[Path]) -> dict:
    """The scoring server's tensor input for `paths`: each image preprocessed as the model's
    training data was (its size, channels and resize mode, from the model's metadata). The model
    (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) is checked from its MLmodel as prediction does."""
    for path in paths:  # every file judged from its header before the model is even looked up
        _named(path, check_image_file, path)
    prep = model_files.read_checked(*model_files.resolve(model_uri)).preprocessing
    images = [_named(path, load_image, path, prep) for path in paths]
    return {"inputs": to_pixels(images, prep).tolist()}


def _named(path: Path, read: Callable, *args):
    """read(*args), an image file's problem raised as a PredictionError naming the file."""
    try:
        return read(*args)
    except ImageFileError as error:
        raise PredictionError(f"{path}: {error}") from None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.predict.serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_uri", help='the model to be served, e.g. "models:/NAME-onnx@champion"')
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    args = parser.parse_args(argv)
    try:
        body = request_body(args.model_uri, args.images)
    except (PredictionError, mlflow.exceptions.MlflowException) as error:
        sys.exit(f"error: {error}")
    json.dump(body, sys.stdout)


if __name__ == "__main__":
    main()
