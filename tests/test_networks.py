import dataclasses

import pytest
import torch

from models import BACKBONES, MODEL_NAMES, ModelSpec, build_from_spec, build_model
from models.networks import CNN, MLP, Normalize


@pytest.mark.parametrize("name", ["mlp", "cnn"])  # backbones: tests/test_backbones.py
@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (32, 24))])
def test_models_return_one_logit_per_class(name, channels, size):
    model = build_model(name, channels, size, 7).eval()
    logits = model(torch.rand(5, channels, *size))
    assert logits.shape == (5, 7)


def test_mlp_logits_are_unbounded_no_final_relu():
    torch.manual_seed(0)
    model = build_model("mlp", 1, (28, 28), 10).eval()
    logits = model(torch.rand(64, 1, 28, 28))
    assert (logits < 0).any(), "a final ReLU would clip every negative logit to 0"
    assert not isinstance(list(model.modules())[-1], torch.nn.ReLU)


def test_normalisation_lives_in_the_model_and_its_state_dict():
    model = build_model("mlp", 3, (8, 8), 2, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    state = model.state_dict()
    assert torch.allclose(state["0.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    fresh = build_from_spec(ModelSpec("mlp", 3, (8, 8), 2))
    fresh.load_state_dict(state)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="'resnet'.*mlp, cnn"):
        build_model("resnet", 1, (28, 28), 10)


def test_model_names_are_the_small_networks_then_the_backbones():
    assert MODEL_NAMES == ("mlp", "cnn", *BACKBONES) and len(MODEL_NAMES) == 7


@pytest.mark.parametrize(
    "name, body",
    [("mlp", lambda: MLP(1 * 28 * 28, 10)), ("cnn", lambda: CNN(1, (28, 28), 10))],
)
def test_mlp_and_cnn_build_as_before_same_init_and_keys(name, body):
    torch.manual_seed(3)
    built = build_model(name, 1, (28, 28), 10).state_dict()
    torch.manual_seed(3)
    before = torch.nn.Sequential(Normalize((0.5,), (0.5,)), body()).state_dict()
    assert list(built) == list(before)
    assert all(torch.equal(built[key], before[key]) for key in before)


def test_model_spec_carries_the_resize_mode_and_stays_frozen():
    spec = ModelSpec("cnn", 1, (28, 28), 10)
    assert spec.resize_mode == "crop"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.resize_mode = "pad"  # type: ignore[misc]
    padded = build_from_spec(dataclasses.replace(spec, resize_mode="pad"))
    assert padded(torch.rand(2, 1, 28, 28)).shape == (2, 10)
