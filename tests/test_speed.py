import pytest
import torch

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
