"""The docs' serving commands (docs/serving.md), run as written against models registered by a real run."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Processes, free_port, run_train_script, script_env, wait_until_up
from mlflow import MlflowClient
from photos import write_class_folders
from PIL import Image

from tasks.data.photos import list_folder
from tasks.predict.serving import main

PREDICT_SCRIPT = REPO / "flows" / "predict_flow.py"


def readme_serving_commands() -> list[str]:
    """The three command lines of docs/serving.md's 'Serving over HTTP' block."""
    section = (REPO / "docs" / "serving.md").read_text().split("## Serving over HTTP", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


PHOTO_SIZES = [(40 + 7 * k, 120 - 5 * k) for k in range(12)] + [(90 - 3 * k, 48 + 6 * k) for k in range(12)]


@pytest.mark.slow
def test_photos_train_register_and_answer_batch_and_served_as_evaluated(tmp_path, monkeypatch):
    """Issue 16's end-to-end: a class-folder tree of every kind and many sizes trains a resnet18 at
    64 px (registered, ONNX gate passed, preprocessing in the model card); then the docs'
    serving commands (both flavors) and batch prediction (both flavors) give, image by image, what
    evaluation computed for the same files during training."""
    written = write_class_folders(tmp_path / "photos", ["ant", "bee", "wasp"], 200, PHOTO_SIZES)
    assert len({Image.open(p).size for files in written.values() for p in files}) >= 20
    flags = ["--dataset", "folder", "--train-dir", "photos", "--model", "resnet18", "--image-size", "64"]
    trained = run_train_script(tmp_path, *flags, "--epochs", "1", "--registered-model", "photos", seeded=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = Path(trained.stdout.rsplit("outputs in ", 1)[1].strip())
    monkeypatch.chdir(tmp_path)  # the run's store and its ./mlruns artefacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", script_env(tmp_path)["MLFLOW_TRACKING_URI"])
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
    """The docs' serving commands for each flavor and predict_flow.py on my-photos for each, all
    at once (starting processes is most of the time): the served logits and the batch CSVs."""
    env = {
        **script_env(folder),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # the docs run these from the repository root
    }
    serve, request, post = readme_serving_commands()
    assert serve.startswith("mlflow models serve") and serve.endswith("&")
    assert "tasks.predict.serving" in request and "> request.json" in request and "@request.json" in post
    ports = {flavor: str(free_port()) for flavor in flavors}
    commands = {
        flavor: [
            line.replace("photos-onnx", flavor).replace("5001", ports[flavor]).replace("request", flavor)
            for line in (serve, request, post)
        ]
        for flavor in flavors
    }
    processes = Processes(folder, env, grace=5)
    try:
        predicting = {}
        for flavor in flavors:
            model = ["--registered-model", "photos", "--flavor", "onnx" if "onnx" in flavor else "pytorch"]
            command = [sys.executable, str(PREDICT_SCRIPT), *model, "--image-dir", "my-photos"]
            command += ["--output", f"batch-{flavor}.csv"]
            predicting[flavor] = processes.start_shell(f"predict-{flavor}", shlex.join(command), folder)
        servers = {
            flavor: processes.start_shell(f"serve-{flavor}", lines[0].removesuffix("&"), folder)
            for flavor, lines in commands.items()
        }
        for started in [shell(lines[1], folder, env) for lines in commands.values()]:
            finish(started)
        served = {}
        for flavor, lines in commands.items():
            wait_until_up(f"http://127.0.0.1:{ports[flavor]}/ping", *servers[flavor])
            answer = json.loads(finish(shell(lines[2], folder, env)))
            served[flavor] = np.array(answer["predictions"], dtype=np.float32)
        for process, log in predicting.values():
            assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        processes.stop_all()
    return served, {flavor: pd.read_csv(folder / f"batch-{flavor}.csv") for flavor in flavors}


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A documented command line, started in `cwd` as a user's shell would run it."""
    return subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> str:
    """The standard output of a command line started by `shell`, once it has succeeded."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"{process.args[-1]}:\n{err[-3000:]}"
    return out


def test_request_body_names_a_bad_image(tmp_path, capsys):
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(SystemExit, match="not.png"):
        main(["models:/m@champion", str(tmp_path / "not.png")])
