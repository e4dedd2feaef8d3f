"""The README's serving commands, run as written against models registered by a real run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Processes, free_port, run_train_script, script_env, wait_until_up
from torchvision.io import write_png

from tasks.data.offline_data import load_digits
from tasks.predict.serving import main

PREDICT_SCRIPT = REPO / "flows" / "predict_flow.py"


def readme_serving_commands() -> list[str]:
    """The three command lines of the README's 'Serving over HTTP' block."""
    section = (REPO / "README.md").read_text().split("### Serving over HTTP", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.slow
def test_readme_serving_commands_answer_what_batch_prediction_does(tmp_path):
    trained = run_train_script(tmp_path, "--dataset", "digits", "--epochs", "1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    digits = load_digits()
    (tmp_path / "my-images").mkdir()
    for index in range(12):
        write_png(digits.test_images[index], str(tmp_path / "my-images" / f"{index:02d}.png"))
    predicted = run_train_script(
        tmp_path,
        "--registered-model",
        "digits-cnn",
        "--image-dir",
        "my-images",
        "--output",
        "batch.csv",
        script=PREDICT_SCRIPT,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    batch = pd.read_csv(tmp_path / "batch.csv")

    env = {
        **script_env(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # the README runs these from the repository root
    }
    serve, request, post = readme_serving_commands()
    assert (
        serve.startswith("mlflow models serve") and serve.endswith("&") and "tasks.predict.serving" in request
    )
    served = {}
    for flavor in ("digits-cnn-onnx", "digits-cnn"):
        port = str(free_port())
        commands = [
            line.replace("digits-cnn-onnx", flavor).replace("5001", port) for line in (serve, request, post)
        ]
        processes = Processes(tmp_path, env, grace=5)
        try:
            process, log = processes.start_shell(f"serve-{flavor}", commands[0].removesuffix("&"), tmp_path)
            wait_until_up(f"http://127.0.0.1:{port}/ping", process, log)
            for command in commands[1:]:
                done = subprocess.run(
                    ["bash", "-c", command],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert done.returncode == 0, done.stderr[-3000:]
            served[flavor] = np.array(json.loads(done.stdout)["predictions"], dtype=np.float32)
        finally:
            processes.stop_all()
    assert served["digits-cnn"].shape == (12, 10)
    assert np.abs(served["digits-cnn"] - served["digits-cnn-onnx"]).max() <= 1e-4
    probabilities = softmax(served["digits-cnn-onnx"])
    assert batch["path"].map(lambda p: Path(p).name).tolist() == [f"{k:02d}.png" for k in range(12)]
    assert (probabilities.argmax(axis=1) == batch["predicted_index"].to_numpy()).all()
    assert np.abs(probabilities.max(axis=1) - batch["confidence"].to_numpy()).max() <= 1e-4


def test_request_body_names_a_bad_image(tmp_path, capsys):
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(SystemExit, match="not.png"):
        main(["models:/m@champion", str(tmp_path / "not.png")])
