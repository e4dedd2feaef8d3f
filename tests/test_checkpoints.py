import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fewer_training_images

from models import ModelSpec, build_from_spec
from tasks.data.datasets import prepare_dataset
from tasks.data.loaders import make_loaders
from tasks.data.sources import DigitsSource, Shape, SyntheticSource
from tasks.train.checkpoints import load_model, load_weights, write_state_dict
from tasks.train.training import TrainSettings, train

REPO = Path(__file__).resolve().parents[1]
SETTINGS = TrainSettings(3, "adamw", 3e-3, 1e-4, "onecycle", seed=0)
IMAGES = 320  # five batches an epoch: a kill mid-write and the resume do not depend on the size

# Trains in a child process whose second checkpoint write stalls half-way, so the test can kill it there.
CHILD = """
import pathlib, sys, time
import torch
sys.path[:0] = [{repo!r}, {tests!r}]
from conftest import fewer_training_images
from models import ModelSpec
from tasks.data.datasets import prepare_dataset
from tasks.data.loaders import make_loaders
from tasks.data.sources import SyntheticSource
from tasks.train.training import TrainSettings, train

real_save, writes = torch.save, []
def stalling_save(obj, handle):
    if "last.pt" in getattr(handle, "name", ""):
        writes.append(1)
        if len(writes) == 2:
            handle.write(b"half a checkpoint" * 1000)
            handle.flush()
            pathlib.Path({marker!r}).touch()
            time.sleep(600)
    real_save(obj, handle)
torch.save = stalling_save

ref = prepare_dataset(SyntheticSource(), pathlib.Path({data!r}))
spec = ModelSpec("mlp", ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)
loaders = fewer_training_images(make_loaders(ref, 64, 0.1, 0, "cpu"), ref, {images})
train(spec, loaders, TrainSettings(*{settings!r}), pathlib.Path({checkpoint!r}))
"""


def run_training(ref, checkpoint: Path):
    spec = ModelSpec("mlp", ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)
    loaders = fewer_training_images(make_loaders(ref, 64, 0.1, 0, "cpu"), ref, IMAGES)
    return train(spec, loaders, SETTINGS, checkpoint)


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path / "data")
    checkpoint, marker = tmp_path / "run" / "last.pt", tmp_path / "writing"
    code = CHILD.format(
        repo=str(REPO),
        tests=str(REPO / "tests"),
        images=IMAGES,
        marker=str(marker),
        data=str(tmp_path / "data"),
        settings=tuple(SETTINGS.__dict__.values()),
        checkpoint=str(checkpoint),
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the child never reached its second checkpoint write"
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    assert [p.name for p in checkpoint.parent.glob(".last.pt.*.part")]  # the half-written file
    survivor = torch.load(checkpoint, weights_only=True)
    assert len(survivor["history"]) == 1  # the first epoch's checkpoint is intact

    model, history = run_training(ref, checkpoint)
    assert len(history) == 3 and history[0] == survivor["history"][0]
    assert not list(checkpoint.parent.glob(".last.pt.*.part"))

    straight, _ = run_training(ref, tmp_path / "straight" / "last.pt")
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


class Interrupted(Exception):
    pass


def test_an_augmented_run_resumed_after_an_epoch_ends_with_the_same_weights(tmp_path):
    """The loader's generator draws the shuffle and the augmentation, and is checkpointed: resuming
    replays the same crops, flips and jitter (bit-identical on CPU)."""
    ref = prepare_dataset(DigitsSource(), tmp_path / "data", shape=Shape("3"))
    spec = ModelSpec("mlp", ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)
    settings = TrainSettings(2, "adamw", 3e-3, 1e-4, "onecycle", seed=0)

    def loaders():
        return fewer_training_images(make_loaders(ref, 64, 0.1, 0, "cpu", augment="standard"), ref, 320)

    def stop_after_first(epoch, metrics):
        raise Interrupted

    checkpoint = tmp_path / "resumed" / "last.pt"
    with pytest.raises(Interrupted):
        train(spec, loaders(), settings, checkpoint, on_epoch=stop_after_first)
    resumed, history = train(spec, loaders(), settings, checkpoint)
    straight, straight_history = train(spec, loaders(), settings, tmp_path / "straight" / "last.pt")
    assert len(history) == 2 and history[1]["train_loss"] == straight_history[1]["train_loss"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    unaugmented = fewer_training_images(make_loaders(ref, 64, 0.1, 0, "cpu"), ref, 320)
    plain, _ = train(spec, unaugmented, settings, tmp_path / "plain" / "last.pt")
    assert not torch.equal(
        plain.state_dict()["1.linear_relu_stack.0.weight"],
        straight.state_dict()["1.linear_relu_stack.0.weight"],
    )


def test_state_dict_reloads_with_weights_only_into_a_fresh_model(tmp_path):
    spec = ModelSpec("cnn", 1, (28, 28), 10, (0.3,), (0.4,))
    torch.manual_seed(0)
    model = build_from_spec(spec).eval()
    weights = write_state_dict(model.state_dict(), tmp_path / "model_weights.pth")
    reloaded = load_model(spec, weights)  # a fresh network, the file read with weights_only
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(reloaded(x), model(x)) and not reloaded.training


def test_load_weights_refuses_pickled_code(tmp_path):
    torch.save({"bad": object()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed") as refused:
        load_weights(tmp_path / "evil.pth")
    assert "Unsupported global: GLOBAL object" in str(refused.value)  # names what it would have run
