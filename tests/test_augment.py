import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from tasks.data.augment import (
    AUGMENT_POLICIES,
    augment_batch,
    crop_flip_jitter,
    draw_standard,
    resolve_augment,
)
from tasks.data.sources import (
    CsvSource,
    DigitsSource,
    FashionMnistSource,
    FolderSource,
    MnistSource,
    SyntheticSource,
)

_NO_JITTER = torch.ones(1, 3)


def _batch(count: int = 16, channels: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)


def test_none_is_plain_scaling_and_draws_nothing():
    images, generator = _batch(), torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert torch.equal(augment_batch(images, "none", generator), images.float() / 255)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("policy", ["flip", "standard"])
def test_same_generator_state_gives_identical_batches(policy):
    images, generator = _batch(), torch.Generator().manual_seed(7)
    state = generator.get_state()
    first = augment_batch(images, policy, generator)
    assert not torch.equal(generator.get_state(), state)  # randomness was consumed
    generator.set_state(state)
    assert torch.equal(augment_batch(images, policy, generator), first)
    again = augment_batch(images, policy, torch.Generator().manual_seed(7))
    other = augment_batch(images, policy, torch.Generator().manual_seed(8))
    assert torch.equal(again, first) and not torch.equal(other, first)


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("count", [1, 5])
def test_shape_dtype_range_and_device(policy, channels, count):
    images = _batch(count, channels, size=9)[..., :7]  # not square, not contiguous
    out = augment_batch(images, policy, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_channels_last_stays_channels_last(policy):
    images = _batch().contiguous(memory_format=torch.channels_last)
    out = augment_batch(images, policy, torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_flip_mirrors_some_samples_exactly_and_leaves_the_rest():
    images = _batch(count=64)
    out = augment_batch(images, "flip", torch.Generator().manual_seed(1))
    plain, mirrored = images.float() / 255, torch.flip(images, dims=[3]).float() / 255
    same = [torch.equal(o, p) for o, p in zip(out, plain)]
    flipped = [torch.equal(o, m) for o, m in zip(out, mirrored)]
    assert all(s != f for s, f in zip(same, flipped))  # each sample is exactly one of the two
    assert 16 < sum(flipped) < 48


def test_full_crop_without_flip_or_jitter_is_identity():
    images = _batch(count=2, size=10)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = crop_flip_jitter(images, crops, torch.tensor([False, False]), _NO_JITTER.expand(2, 3))
    assert torch.allclose(out, images.float() / 255, atol=1e-5)
    flipped = crop_flip_jitter(images, crops, torch.tensor([True, False]), _NO_JITTER.expand(2, 3))
    assert torch.allclose(flipped[0], images[0].flip(-1).float() / 255, atol=1e-5)


def test_crop_of_left_half_sees_only_the_left_half():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    images[..., 4:] = 255
    left_half = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    out = crop_flip_jitter(images, left_half, torch.tensor([False]), _NO_JITTER)
    assert out.max() < 1e-5
    right_half = torch.tensor([[0.5, 0.0, 0.5, 1.0]])
    assert crop_flip_jitter(images, right_half, torch.tensor([False]), _NO_JITTER).min() > 1 - 1e-5
    mirrored = crop_flip_jitter(images, left_half, torch.tensor([True]), _NO_JITTER)
    assert mirrored.max() < 1e-5  # a flip mirrors within the crop, it does not move the crop


def test_drawn_crops_stay_inside_the_image_and_cover_the_scale_range():
    crops, flips, factors = draw_standard(2000, (32, 48), torch.Generator().manual_seed(0))
    left, top, width, height = crops.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + width <= 1 + 1e-6).all() and (top + height <= 1 + 1e-6).all()
    area = width * height
    assert area.min() >= 0.35 * 0.74 and area.max() <= 1  # clipping only shrinks area
    assert ((factors >= 0.8) & (factors <= 1.2)).all() and 800 < flips.sum() < 1200


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_moves_flat_grey_by_at_most_a_fifth(channels):
    images = torch.full((256, channels, 6, 6), 128, dtype=torch.uint8)
    out = augment_batch(images, "standard", torch.Generator().manual_seed(2))
    means = out.mean(dim=(1, 2, 3)) * 255 / 128
    assert means.min() >= 0.8 - 1e-5 and means.max() <= 1.2 + 1e-5
    assert means.min() < 0.85 and means.max() > 1.15  # the factors do spread over the range


def test_fused_jitter_matches_torchvision_colour_ops_one_at_a_time():
    images = torch.randint(80, 180, (3, 3, 8, 8), dtype=torch.uint8)  # mid-range: no clamping
    factors = torch.tensor([[0.8, 1.2, 0.9], [1.2, 0.8, 1.2], [1.1, 1.15, 0.8]])
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    out = crop_flip_jitter(images, whole, torch.zeros(3, dtype=torch.bool), factors)
    for image, (brightness, contrast, saturation), got in zip(images, factors.tolist(), out):
        expected = TF.adjust_brightness(image.float() / 255, brightness)
        expected = TF.adjust_contrast(expected, contrast)
        expected = TF.adjust_saturation(expected, saturation)
        assert torch.allclose(got, expected, atol=1e-4)


def test_channels_last_input_gives_the_same_values():
    images, generator = _batch(), torch.Generator().manual_seed(4)
    state = generator.get_state()
    plain = augment_batch(images, "standard", generator)
    generator.set_state(state)
    strided = augment_batch(images.contiguous(memory_format=torch.channels_last), "standard", generator)
    assert torch.allclose(plain, strided, atol=1e-6)


def test_standard_keeps_colour_of_a_colourful_image_roughly():
    images = _batch(count=8, size=16)
    out = augment_batch(images, "standard", torch.Generator().manual_seed(3))
    ratio = out.mean(dim=(0, 2, 3)) / (images.float().mean(dim=(0, 2, 3)) / 255)
    assert ((ratio > 0.6) & (ratio < 1.4)).all()


def test_resolve_auto_is_the_sources_default_standard_only_for_colour_photos():
    photos = [FolderSource(train_dir="t"), CsvSource(train_csv="a", test_csv="b", image_root="r")]
    for source in photos:
        assert resolve_augment("auto", source, 3) == "standard"
        assert resolve_augment("auto", source, 1) == "none"
    for source in (MnistSource(), FashionMnistSource(), SyntheticSource(), DigitsSource()):
        assert resolve_augment("auto", source, 3) == "none"
    for policy in AUGMENT_POLICIES:
        assert resolve_augment(policy, MnistSource(), 1) == policy


def test_resolve_rejects_unknown_policy_naming_the_choices():
    with pytest.raises(ValueError, match="'rotate'.*auto, none, flip, standard"):
        resolve_augment("rotate", FolderSource(train_dir="t"), 3)
    with pytest.raises(ValueError, match="'auto'"):
        augment_batch(_batch(), "auto", torch.Generator())
