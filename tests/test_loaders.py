import pytest
import torch

from tasks.data.datasets import load_tensors, prepare_dataset
from tasks.data.loaders import TensorLoader, make_loaders, split_indices
from tasks.data.sources import SyntheticSource


def test_batches_cover_every_sample_once_scaled_to_unit_range():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2) * 25
    loader = TensorLoader(images, torch.arange(10), batch_size=4, shuffle=True, seed=3)
    seen = torch.cat([labels for _, labels in loader])
    assert sorted(seen.tolist()) == list(range(10)) and len(loader) == 3
    pixels, labels = next(iter(TensorLoader(images, torch.arange(10), batch_size=10)))
    assert (
        pixels.dtype == torch.float32
        and pixels.max() <= 1
        and torch.allclose(pixels[:, 0, 0, 0] * 255, labels * 25.0)
    )


def test_shuffle_is_seeded():
    def order(seed):
        loader = TensorLoader(
            torch.zeros(50, 1, 1, 1, dtype=torch.uint8), torch.arange(50), 50, shuffle=True, seed=seed
        )
        return next(iter(loader))[1].tolist()

    assert order(1) == order(1) and order(1) != order(2)


def test_split_is_disjoint_and_complete():
    train, val = split_indices(100, 0.2, seed=0)
    assert len(val) == 20 and sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert len(split_indices(2, 0.01, 0)[1]) == 1 and len(split_indices(2, 0.99, 0)[0]) == 1


def test_make_loaders_splits_the_training_set(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path)
    loaders = make_loaders(ref, batch_size=32, val_fraction=0.25, seed=0, device="cpu")
    assert loaders.train.num_samples + loaders.val.num_samples == ref.train_size
    assert loaders.val.num_samples == ref.train_size // 4 and loaders.test.num_samples == ref.test_size


def test_a_shuffled_pass_leaves_out_a_last_batch_of_one():
    loader = TensorLoader(torch.zeros(9, 1, 1, 1, dtype=torch.uint8), torch.arange(9), 4, shuffle=True)
    assert [len(labels) for _, labels in loader] == [4, 4] and loader.num_samples == 8 and len(loader) == 2
    in_order = TensorLoader(torch.zeros(9, 1, 1, 1, dtype=torch.uint8), torch.arange(9), 4)
    assert [len(labels) for _, labels in in_order] == [4, 4, 1]  # evaluation sees every image


def test_loaders_gather_from_the_mapped_file_without_copying_the_split(tmp_path):
    ref = prepare_dataset(SyntheticSource(), tmp_path)
    loaders = make_loaders(ref, batch_size=32, val_fraction=0.25, seed=0, device="cpu")
    mapped = load_tensors(ref.prepared_path).train_images
    assert loaders.train.images.numpy().base is not None and loaders.train.images.shape == mapped.shape
    pixels, labels = next(iter(loaders.val))
    first = loaders.val.indices[: len(labels)]
    assert torch.equal(pixels, mapped[first].float() / 255)
    assert torch.equal(labels, load_tensors(ref.prepared_path).train_labels[first])


@pytest.mark.parametrize("count", [1, 2, 7, 9, 33, 64, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_share_each_epoch_disjointly_and_together_make_the_single_process_epoch(world, count):
    """Every global batch splits into disjoint shares, one per rank, that make it whole; the ranks
    take the same number of steps, and each epoch's shuffle is its own."""
    if world > 1 and count < 2:
        pytest.skip("a training split holds at least 2 images")
    images, labels = torch.zeros(count, 1, 1, 1, dtype=torch.uint8), torch.arange(count)

    def loader(rank: int, world: int) -> TensorLoader:
        return TensorLoader(images, labels, 8, shuffle=True, seed=5, rank=rank, world=world)

    epochs = []
    for epoch in (1, 2, 3):
        single = loader(0, 1)
        single.set_epoch(epoch)
        ranks = [loader(rank, world) for rank in range(world)]
        for each in ranks:
            each.set_epoch(epoch)
        shares = [list(each.shares()) for each in ranks]
        assert {len(steps) for steps in shares} == {len(single)}  # the same steps on every rank
        for step, whole in enumerate(single.shares()):
            parts = [steps[step] for steps in shares]
            assert torch.equal(torch.cat(parts), whole)  # disjoint, in order, and the whole batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        epochs.append(torch.cat(list(single.shares())).tolist())
        assert sorted(torch.cat([labels for each in ranks for _, labels in each]).tolist()) == sorted(
            epochs[-1]
        )
    assert count < 3 or epochs[0] != epochs[1]  # reshuffled every epoch
