import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models import ModelSpec, build_from_spec
from models.logits_pyfunc import OnnxLogits
from tasks.publish.export import compare_onnx, fp32_tolerance, write_onnx

SPEC = ModelSpec("cnn", 1, (28, 28), 10, (0.3,), (0.4,))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    return model, write_onnx(model, torch.rand(2, 1, 28, 28), folder / "model.onnx")


def test_onnx_has_named_io_and_a_dynamic_batch(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixels"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    assert not list(path.parent.glob("*.data"))  # weights inside the one file


def test_parity_passes_at_batch_one_and_large_batches(exported):
    model, path = exported
    pixels = torch.rand(1500, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixels)
    report = compare_onnx(expected, path, pixels, batch_size=1024, single_samples=5)
    assert report.passed and report.samples == 1500 and report.single_samples == 5
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0


def test_parity_fails_when_the_onnx_weights_differ(exported, tmp_path):
    model, path = exported
    proto = onnx.load(str(path))
    weight = next(
        t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    )
    values = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array((values + 0.5).astype(values.dtype), weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    pixels = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        report = compare_onnx(model(pixels), tampered, pixels)
    assert not report.passed and report.max_abs_diff > 1e-4


def test_onnx_pyfunc_loader_returns_the_logits_array(exported):
    model, path = exported
    x = np.random.rand(3, 1, 28, 28).astype(np.float32)
    got = OnnxLogits(str(path)).predict(x)
    assert isinstance(got, np.ndarray) and got.shape == (3, 10)
    assert np.abs(got - model(torch.from_numpy(x)).detach().numpy()).max() < 1e-4
    assert np.array_equal(OnnxLogits(str(path)).predict({"pixels": x}), got)


def test_parity_checks_every_image_against_its_own_logits(exported):
    model, path = exported
    pixels = torch.rand(300, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixels)
    expected[250, 0] += 1.0  # a disagreement on one image of the last batch only
    report = compare_onnx(expected, path, pixels, batch_size=128, single_samples=4)
    assert not report.passed and report.max_abs_diff == pytest.approx(1.0, abs=1e-3)


def test_the_fp32_tolerance_stays_near_the_gate_and_below_a_tampered_graph(exported, tmp_path):
    """The bound for deep networks is 1e-4 plus twice PyTorch's own fp32 error against float64: for
    this CNN that is barely above 1e-4, far below what a tampered weight does to the logits."""
    model, path = exported
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 2)
    values = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array((values * 1.001).astype(values.dtype), weight.name))
    onnx.save(proto, str(tmp_path / "slightly.onnx"))
    pixels = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        expected = model(pixels)
    report = compare_onnx(expected, tmp_path / "slightly.onnx", pixels)
    tolerance = fp32_tolerance(model, pixels, expected, report.worst_rows)
    assert 1e-4 < tolerance < 1.1e-4 and len(report.worst_rows) == 64
    assert report.max_abs_diff > tolerance  # a 0.1% change to one layer's weights is caught
