import functools
import shutil

import pytest
import torch
from conftest import EPOCH_METRICS, fewer_training_images

from models import ModelSpec
from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.loaders import TensorLoader, make_loaders
from tasks.data.sources import DigitsSource
from tasks.train.speed import Levers
from tasks.train.training import (
    TrainSettings,
    evaluate_loss,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_dataset(DigitsSource(), tmp_path_factory.mktemp("data"))


def spec_for(ref, name="mlp"):
    return ModelSpec(name, ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)


def resume_settings(precision: str, epochs: int = 3) -> TrainSettings:
    return TrainSettings(epochs, "adamw", 3e-3, 1e-4, "onecycle", seed=5, precision=precision)


def few_images(digits):
    return fewer_training_images(make_loaders(digits, 64, 0.1, seed=5, device="cpu"), digits, 320)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    """uninterrupted(model, precision): a 3-epoch run on 320 images, made once per module; its
    folder holds last.pt and after_two.pt, the checkpoint as it stood after epoch 2."""

    @functools.cache
    def run(model: str, precision: str):
        folder = tmp_path_factory.mktemp(f"{model}-{precision}")

        def keep_second(epoch, metrics):
            if epoch == 2:
                shutil.copyfile(folder / "last.pt", folder / "after_two.pt")

        spec, settings = spec_for(digits, model), resume_settings(precision)
        trained, history = train(spec, few_images(digits), settings, folder / "last.pt", keep_second)
        return trained, history, folder

    return run


def test_auto_device_and_absent_cuda():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' was requested but is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizers(name):
    model = torch.nn.Linear(2, 2)
    assert make_optimizer(model, name, 0.1, 0.0).param_groups[0]["lr"] == 0.1


def test_schedules_and_bad_names():
    optimizer = make_optimizer(torch.nn.Linear(2, 2), "sgd", 1.0, 0.0)
    cosine = make_scheduler(optimizer, "cosine", total_steps=10)
    for _ in range(10):
        optimizer.step()
        cosine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="'step'.*onecycle"):
        make_scheduler(optimizer, "step", 10)
    with pytest.raises(ValueError, match="'lbfgs'"):
        make_optimizer(torch.nn.Linear(2, 2), "lbfgs", 1.0, 0.0)


def test_schedules_start_from_each_groups_own_rate():
    head, backbone = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    for name in ("onecycle", "cosine", "constant"):
        optimizer = torch.optim.SGD([{"params": [head], "lr": 0.1}, {"params": [backbone], "lr": 0.01}])
        scheduler = make_scheduler(optimizer, name, 100)
        for _ in range(50):
            optimizer.step()
            scheduler.step()
        head_lr, backbone_lr = (group["lr"] for group in optimizer.param_groups)
        assert head_lr == pytest.approx(10 * backbone_lr), name  # one schedule, scaled per group
        assert 0 < head_lr <= 0.1, name


def test_learns_real_digits_far_above_chance(digits, tmp_path):
    loaders = make_loaders(digits, 64, 0.1, seed=0, device="cpu")
    seen, steps, started = [], [], []
    model, history = train(
        spec_for(digits, "mlp"),  # 97% in two epochs, a third of the CNN's time; the flow tests train the CNN
        loaders,
        TrainSettings(2, "adamw", 3e-3, 1e-4, "onecycle", 0),
        tmp_path / "last.pt",
        on_epoch=lambda epoch, metrics: seen.append(epoch),
        on_batch=lambda epoch, batch: steps.append((epoch, batch)),
        on_start=started.append,
    )
    assert started == [Levers("fp32", channels_last=False, compile=False)]  # an MLP has no convolutions
    assert seen == [1, 2] and len(history) == 2
    batches = len(loaders.train)
    assert steps == [(epoch, batch) for epoch in (1, 2) for batch in range(1, batches + 1)]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) == set(EPOCH_METRICS)
    assert evaluate_loss(model, loaders.test)["accuracy"] > 0.9  # chance is 0.1


@pytest.mark.parametrize(
    "model, precision", [("mlp", "fp32"), pytest.param("cnn", "bf16", id="cnn-bf16-channels-last")]
)
def test_resumed_training_equals_uninterrupted(digits, uninterrupted, tmp_path, model, precision):
    """A run stopped after epoch 2 (its checkpoint then, as a crash leaves it) and resumed ends
    bit for bit where the uninterrupted one does."""
    straight, straight_history, folder = uninterrupted(model, precision)
    shutil.copyfile(folder / "after_two.pt", tmp_path / "last.pt")
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["history"]) == 2
    resumed, resumed_history = train(
        spec_for(digits, model), few_images(digits), resume_settings(precision), tmp_path / "last.pt"
    )
    assert len(resumed_history) == 3 and resumed_history[:2] == straight_history[:2]
    assert resumed_history[2]["train_loss"] == straight_history[2]["train_loss"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bf16_channels_last_training_keeps_fp32_weights_and_refuses_a_resume_in_another_precision(
    digits, uninterrupted, tmp_path
):
    model, _, folder = uninterrupted("cnn", "bf16")
    conv = model[1].features[0][0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last)
    loaders = few_images(digits)
    assert evaluate_loss(model, loaders.test)["accuracy"] > 0.5  # fp32 inference of bf16-trained weights
    shutil.copyfile(folder / "last.pt", tmp_path / "last.pt")
    with pytest.raises(ValueError, match="trained in bf16.*--precision bf16"):
        train(spec_for(digits, "cnn"), loaders, resume_settings("fp32", epochs=4), tmp_path / "last.pt")


@pytest.mark.slow
def test_compiled_training_learns_and_checkpoints_the_plain_module(digits, tmp_path):
    loaders = make_loaders(digits, 64, 0.1, seed=0, device="cpu")
    # Whole batches only: a smaller last batch would have torch.compile build a second training
    # graph, with dynamic shapes (seconds more on 2 cores with a cold inductor cache, as in CI).
    whole = loaders.train.num_samples // 64 * 64
    data = load_tensors(digits.prepared_path)
    indices = loaders.train.indices[:whole]
    batches = TensorLoader(data.train_images, data.train_labels, 64, shuffle=True, indices=indices)
    loaders = loaders._replace(train=batches)
    settings = TrainSettings(2, "adamw", 3e-3, 1e-4, "onecycle", 0, compile=True)
    # The MLP: compiling is the same call for every network, and inductor generates and builds
    # less than half the code for it that it does for the CNN (cold: 14 s of CPU rather than 36).
    levers = []
    model, _ = train(spec_for(digits, "mlp"), loaders, settings, tmp_path / "last.pt", on_start=levers.append)
    assert levers == [Levers("fp32", channels_last=False, compile=True)]
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert set(saved) == set(model.state_dict())  # no "_orig_mod." prefixes
    assert evaluate_loss(model, loaders.test)["accuracy"] > 0.9


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7, 8, 100])
def test_one_cycle_schedules_runs_of_any_length(steps):
    """OneCycleLR divides by zero when its warm-up is exactly one step (4 steps at a quarter)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = make_scheduler(optimizer, "onecycle", steps)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert 0 < min(used) and max(used) <= 0.1 + 1e-12
    assert used[0] < 0.1 and (steps < 3 or max(used) == pytest.approx(0.1))  # warms up to the peak
