"""The README's serving commands, run as written against models registered by a real run."""

import json
import os
import shlex
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
    env = {
        **script_env(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # the README runs these from the repository root
    }
    serve, request, post = readme_serving_commands()
    assert serve.startswith("mlflow models serve") and serve.endswith("&")
    assert "tasks.predict.serving" in request and "> request.json" in request and "@request.json" in post
    flavors = {"digits-cnn-onnx": str(free_port()), "digits-cnn": str(free_port())}
    # Both flavors are served at once, beside the batch prediction (starting processes is most of
    # this test's time), so each gets its own port and the PyTorch flavor its own request file.
    commands = {
        flavor: [
            line.replace("digits-cnn-onnx", flavor).replace("5001", port).replace("request.json", body)
            for line in (serve, request, post)
        ]
        for (flavor, port), body in zip(flavors.items(), ("request.json", "request-pytorch.json"))
    }
    processes = Processes(tmp_path, env, grace=5)
    try:
        batch_command = [sys.executable, str(PREDICT_SCRIPT), "--registered-model", "digits-cnn"]
        batch_command += ["--image-dir", "my-images", "--output", "batch.csv"]
        predicting = processes.start_shell("predict", shlex.join(batch_command), tmp_path)
        servers = {
            flavor: processes.start_shell(f"serve-{flavor}", lines[0].removesuffix("&"), tmp_path)
            for flavor, lines in commands.items()
        }
        requests = [shell(lines[1], tmp_path, env) for lines in commands.values()]
        for started in requests:
            finish(started)
        served = {}
        for flavor, lines in commands.items():
            wait_until_up(f"http://127.0.0.1:{flavors[flavor]}/ping", *servers[flavor])
            answer = json.loads(finish(shell(lines[2], tmp_path, env)))
            served[flavor] = np.array(answer["predictions"], dtype=np.float32)
        process, log = predicting
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        processes.stop_all()
    batch = pd.read_csv(tmp_path / "batch.csv")
    assert served["digits-cnn"].shape == (12, 10)
    assert np.abs(served["digits-cnn"] - served["digits-cnn-onnx"]).max() <= 1e-4
    probabilities = softmax(served["digits-cnn-onnx"])
    assert batch["path"].map(lambda p: Path(p).name).tolist() == [f"{k:02d}.png" for k in range(12)]
    assert (probabilities.argmax(axis=1) == batch["predicted_index"].to_numpy()).all()
    assert np.abs(probabilities.max(axis=1) - batch["confidence"].to_numpy()).max() <= 1e-4


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A README command line, started in `cwd` as a user's shell would run it."""
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
