"""The docs' serving commands (docs/serving.md), run against models registered by a real run."""

import contextlib
import functools
import glob
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Processes, free_port, script_env, wait_until_up
from mlflow import MlflowClient
from photos import write_class_folders
from PIL import Image

from flows.config import PredictConfig, TrainConfig
from flows.train_flow import train_flow
from tasks.data.photos import list_folder
from tasks.predict import model_files, serving
from tasks.predict.prediction import find_registered
from tasks.predict.steps import list_images, predict_partition
from tasks.track import tracking

# The steps of docs/serving.md's 'Serving over HTTP' block, by how each line starts.
DOC_STEPS = {
    "check": "python -m tasks.predict.model_files check ",
    "serve": "mlflow models serve ",
    "request": "python -m tasks.predict.serving ",
    "post": "curl -s http://127.0.0.1:5001/invocations ",
}


def docs_serving_steps() -> dict[str, str]:
    """The check, serve, request and post lines of docs/serving.md's 'Serving over HTTP' block."""
    section = (REPO / "docs" / "serving.md").read_text().split("## Serving over HTTP", 1)[1]
    lines = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    found = {step: [line for line in lines if line.startswith(start)] for step, start in DOC_STEPS.items()}
    assert all(len(matches) == 1 for matches in found.values()), f"expected one line each of {DOC_STEPS}"
    return {step: matches[0] for step, matches in found.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


PHOTO_SIZES = [(40 + 7 * k, 120 - 5 * k) for k in range(12)] + [(90 - 3 * k, 48 + 6 * k) for k in range(12)]


@pytest.mark.slow
def test_photos_train_register_and_answer_batch_and_served_as_evaluated(
    prefect_server, mlflow_store, tmp_path
):
    """Issue 16's end-to-end: a class-folder tree of every kind and many sizes trains a resnet18 at
    64 px (registered, ONNX gate passed, preprocessing in the model card); then the docs' serving
    commands (both flavors) and batch prediction (both flavors) give, image by image, what
    evaluation computed for the same files during training. (The training runs here, not as a
    script: test_doc_commands runs the script on a photo folder, and starts a server per flavor.)"""
    # 40 a class: every kind and every size still appear, in a test split of 24 (the answers are
    # compared image by image, so more images would prove nothing more).
    written = write_class_folders(tmp_path / "photos", ["ant", "bee", "wasp"], 40, PHOTO_SIZES)
    assert len({Image.open(p).size for files in written.values() for p in files}) >= 20
    config = TrainConfig(
        dataset="folder",
        train_dir=str(tmp_path / "photos"),
        model="resnet18",
        image_size="64",
        epochs=1,
        registered_model="photos",
        data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "outputs"),
    )
    run_dir = Path(train_flow(config)["run_dir"])
    check_registered("photos")
    evaluated = np.load(run_dir / "test_logits.npy")
    # The test split, in the order evaluation saw it, copied to one folder in that order.
    test_files = list_folder(tmp_path / "photos").test[0]
    (tmp_path / "my-photos").mkdir()
    for index, source in enumerate(test_files):
        shutil.copy(source, tmp_path / "my-photos" / f"{index:04d}-{Path(source).name}")
    served, batches = serve_and_predict(tmp_path, ["photos-onnx", "photos"])
    assert served["photos"].shape == evaluated.shape == (len(test_files), 3)
    for flavor in served:
        assert np.abs(served[flavor] - evaluated).max() <= 1e-4, flavor
        batch = batches[flavor]
        assert [Path(p).name for p in batch["path"]] == sorted(os.listdir(tmp_path / "my-photos"))
        assert (batch["predicted_index"].to_numpy() == evaluated.argmax(axis=1)).all(), flavor
        assert np.abs(batch["confidence"].to_numpy() - softmax(evaluated).max(axis=1)).max() <= 1e-4


def check_registered(name: str) -> None:
    """Both flavors are champions that passed the ONNX gate, and the card names the preprocessing."""
    client = MlflowClient()
    for registered in (name, name + "-onnx"):
        version = client.get_model_version_by_alias(registered, "champion")
        assert version.tags["onnx_validated"] == "true"
        assert "**Preprocessing** RGB (3 channels), 64x64 pixels, resize mode `crop`" in version.description
        info = mlflow.models.get_model_info(f"models:/{registered}/{version.version}")
        assert info.metadata["preprocessing"] == {"channels": 3, "size": [64, 64], "resize_mode": "crop"}


def serve_and_predict(folder: Path, flavors: list[str]) -> tuple[dict, dict]:
    """The docs' serving steps and batch prediction of my-photos for each flavor: the served logits
    and the batch tables.

    Only the servers run as processes (started first and at once: their start-up is most of the
    time). The docs' `python -m` steps run here as the same command lines (this test has imported
    their modules already; test_doc_commands runs the block itself), and so does what
    predict_flow.py runs for a folder (its listing and partition tasks; test_predict_flow runs the
    flow, and the script on a CSV)."""
    env = {
        **script_env(folder),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # the docs run these from the repository root
    }
    ports = {flavor: str(free_port()) for flavor in flavors}
    steps = {flavor: flavor_steps(flavor, ports[flavor]) for flavor in flavors}
    processes = Processes(folder, env, grace=5)
    try:
        servers = {}
        for flavor in flavors:
            pinned = run_python_step(steps[flavor]["check"], model_files.main)
            assert steps[flavor]["serve"].startswith(f'mlflow models serve -m "{pinned}" ')
            serve = steps[flavor]["serve"].removesuffix("&")
            servers[flavor] = processes.start_shell(f"serve-{flavor}", serve, folder)
        batches = {}
        for flavor in flavors:
            run_python_step(steps[flavor]["request"], serving.main)
            batches[flavor] = predict_batch(folder, "onnx" if flavor.endswith("-onnx") else "pytorch")
        served = {}
        for flavor in flavors:
            wait_until_up(f"http://127.0.0.1:{ports[flavor]}/ping", *servers[flavor])
            answer = json.loads(run_shell_step(steps[flavor]["post"], folder, env))
            served[flavor] = np.array(answer["predictions"], dtype=np.float32)
    finally:
        processes.stop_all()
    return served, batches


def flavor_steps(flavor: str, port: str) -> dict[str, str]:
    """The docs' steps for registered model `flavor`, served on `port`, its request in FLAVOR.json."""
    renames = {"photos-onnx": flavor, "5001": port, "request.json": f"{flavor}.json"}
    steps = docs_serving_steps()
    for step, line in steps.items():
        steps[step] = functools.reduce(lambda text, rename: text.replace(*rename), renames.items(), line)
    return steps


def run_python_step(line: str, module_main: Callable) -> str:
    """A documented `python -m MODULE ARGS [> FILE]` line, run in this process as `module_main(ARGS)`
    with the shell's glob expansion (in the working directory); its printed output, also written to
    FILE when the line redirects to one."""
    command, _, redirect = line.partition(" > ")
    args = [match for word in shlex.split(command)[3:] for match in sorted(glob.glob(word)) or [word]]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        module_main(args)
    if redirect:
        Path(redirect.strip()).write_text(printed.getvalue())
    return printed.getvalue().strip()


def predict_batch(folder: Path, flavor: str) -> pd.DataFrame:
    """What `python flows/predict_flow.py --registered-model photos --flavor FLAVOR --image-dir
    my-photos` predicts (in one partition), as a table."""
    config = PredictConfig(registered_model="photos", flavor=flavor, image_dir="my-photos")
    registered = find_registered(config.registry_name, config.alias)
    inputs = list_images.fn(None, None, config.image_dir, None, folder / "data", registered.class_names)
    output = folder / f"batch-{flavor}.csv"
    predict_partition.fn(registered, inputs, config.batch_size, output, tracking.tracking_uri())
    return pd.read_csv(output)


def run_shell_step(line: str, cwd: Path, env: dict[str, str]) -> str:
    """A documented command line, run in `cwd` as a user's shell would run it; its standard output."""
    done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{line}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_request_body_names_a_bad_image(tmp_path, capsys):
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(SystemExit, match="not.png"):
        serving.main(["models:/m@champion", str(tmp_path / "not.png")])
