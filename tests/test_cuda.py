"""The CUDA paths: run by benchmarks/gpu_check.sh on a machine with a GPU; skipped elsewhere.

Import nothing that needs Prefect or MLflow: the GPU machine may have only torch, onnx and
onnxruntime."""

import numpy as np
import pytest
import torch

from models import ModelSpec, build_from_spec
from tasks.data.datasets import prepare_dataset, test_pixels
from tasks.data.loaders import make_loaders
from tasks.data.sources import DigitsSource
from tasks.publish.export import compare_onnx, write_onnx
from tasks.train import speed
from tasks.train.checkpoints import load_model
from tasks.train.training import TrainSettings, evaluate_loss, predict_logits, resolve_device, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_dataset(DigitsSource(), tmp_path_factory.mktemp("data"))


def spec_for(ref, name="cnn"):
    return ModelSpec(name, ref.channels, ref.image_size, ref.num_classes, ref.mean, ref.std)


def settings(precision="auto", epochs=3, seed=0):
    return TrainSettings(epochs, "adamw", 5e-3, 1e-4, "onecycle", seed, precision=precision)


def test_loaders_and_model_live_on_the_gpu(digits, tmp_path):
    assert resolve_device("auto").type == "cuda"
    loaders = make_loaders(digits, 128, 0.1, 0, "cuda")
    images, labels = next(iter(loaders.train))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.float32
    model, history = train(spec_for(digits), loaders, settings(epochs=1), tmp_path / "last.pt")
    assert next(model.parameters()).is_cuda and len(history) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_mixed_precision_learns_and_keeps_fp32_weights(digits, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    loaders = make_loaders(digits, 128, 0.1, 0, "cuda")
    model, _ = train(spec_for(digits), loaders, settings(precision, epochs=5), tmp_path / "last.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert evaluate_loss(model, loaders.test)["accuracy"] > 0.9
    if precision == "fp16":  # the loss scale travels in the checkpoint
        assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]


def test_auto_precision_on_cuda_follows_native_bf16():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert speed.resolve_precision("auto", CUDA) == ("bf16" if native else "fp32")


def test_resumed_cuda_training_matches_uninterrupted(digits, tmp_path):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def run(checkpoint, stop_after=None):
        loaders = make_loaders(digits, 128, 0.1, 5, "cuda")

        def maybe_stop(epoch, metrics):
            if epoch == stop_after:
                raise KeyboardInterrupt("simulated crash")

        return train(spec_for(digits), loaders, settings("fp32", seed=5), checkpoint, maybe_stop)

    straight, _ = run(tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", stop_after=2)
    resumed, _ = run(tmp_path / "b.pt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_cuda_trained_model_passes_the_onnx_gate(digits, tmp_path):
    loaders = make_loaders(digits, 128, 0.1, 0, "cuda")
    trained, _ = train(spec_for(digits), loaders, settings(), tmp_path / "last.pt")
    weights = {k: v.cpu() for k, v in trained.state_dict().items()}
    model = load_model(spec_for(digits), weights)
    path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    expected, _ = predict_logits(model, make_loaders(digits, 128, 0.1, 0, "cpu").test)
    report = compare_onnx(expected, path, test_pixels(digits))
    assert report.passed and report.max_abs_diff <= 1e-4


def test_onnxruntime_uses_its_cuda_provider_when_installed(tmp_path):
    import onnxruntime

    model = load_model(
        ModelSpec("cnn", 1, (28, 28), 10), build_from_spec(ModelSpec("cnn", 1, (28, 28), 10)).state_dict()
    )
    path = write_onnx(model, torch.rand(2, 1, 28, 28), tmp_path / "model.onnx")
    installed = onnxruntime.get_available_providers()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in installed else "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    pixels = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixels).numpy()
    got = session.run(["logits"], {"pixels": pixels.numpy()})[0]
    print(f"onnxruntime provider: {session.get_providers()[0]}")
    assert session.get_providers()[0] == provider
    assert np.abs(got - expected).max() <= 1e-4
