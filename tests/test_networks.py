import pytest
import torch

from models import MODEL_NAMES, ModelSpec, build_from_spec, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
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
