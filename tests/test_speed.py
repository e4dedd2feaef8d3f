import copy

import pytest
import torch
from torch import nn

from models import build_model
from tasks.train import speed

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_that_compute_it_natively(monkeypatch, native):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: native)
    assert speed.resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert speed.resolve_precision("fp32", CPU) == "fp32"
    assert speed.resolve_precision("bf16", CPU) == "bf16"  # asked for: emulated where not native


def test_fp16_needs_cuda_and_unknown_precisions_are_named():
    with pytest.raises(speed.PrecisionUnavailableError, match="'fp16' needs a CUDA device.*cpu"):
        speed.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="'fp8'.*auto, fp32, bf16, fp16"):
        speed.resolve_precision("fp8", CPU)


def test_channels_last_applies_to_convolutional_models_only(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    cnn, mlp = build_model("cnn", 1, (28, 28), 10), build_model("mlp", 1, (28, 28), 10)
    assert speed.choose_levers(cnn, CPU, "auto", True, False) == speed.Levers("bf16", True, False)
    assert speed.choose_levers(mlp, CPU, "fp32", True, True) == speed.Levers("fp32", False, True)
    assert speed.Levers("bf16", True, False).tags() == {
        "precision": "bf16",
        "channels_last": "true",
        "compile": "false",
    }


def test_autocast_runs_the_forward_pass_in_bf16_and_scaler_is_off_outside_fp16():
    layer = torch.nn.Linear(4, 2)
    with speed.autocast(CPU, "bf16"):
        assert layer(torch.rand(3, 4)).dtype == torch.bfloat16
    with speed.autocast(CPU, "fp32"):
        assert layer(torch.rand(3, 4)).dtype == torch.float32
    assert not speed.grad_scaler(CPU, "bf16").is_enabled()


def test_threads_default_to_physical_cores_and_can_be_set():
    before = torch.get_num_threads()
    try:
        assert speed.set_threads(None) == speed.physical_cores() == torch.get_num_threads()
        assert 1 <= speed.physical_cores() <= torch.multiprocessing.cpu_count()
        assert speed.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_folding_batch_norms_keeps_the_function_and_removes_every_batch_norm():
    torch.manual_seed(0)
    model = build_model("cnn", 1, (28, 28), 10).eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # as after training
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -0.5, 0.5)
    images = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        expected = model(images)
        folded = speed.fold_batch_norms(copy.deepcopy(model))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(images), expected, rtol=0, atol=1e-5)
        mlp = build_model("mlp", 1, (28, 28), 10)
        assert str(speed.fold_batch_norms(copy.deepcopy(mlp))) == str(mlp)
