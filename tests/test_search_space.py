import pytest

from tasks.train.search_space import (
    Range,
    TooManyTrialsError,
    grid_points,
    random_draws,
    trial_count,
    trial_overrides,
)


def test_grid_points_are_the_product_first_field_slowest():
    points = grid_points({"lr": [0.1, 0.2], "model": ["mlp", "cnn"]})
    assert points == [
        {"lr": 0.1, "model": "mlp"},
        {"lr": 0.1, "model": "cnn"},
        {"lr": 0.2, "model": "mlp"},
        {"lr": 0.2, "model": "cnn"},
    ]
    assert grid_points({}) == [{}]


def test_random_draws_are_seeded_in_range_and_typed():
    space = {"lr": Range(1e-4, 1e-1, log=True), "batch_size": Range(16, 256)}
    draws = random_draws(space, 200, seed=3, integers=frozenset({"batch_size"}))
    assert draws == random_draws(space, 200, seed=3, integers=frozenset({"batch_size"}))
    assert draws != random_draws(space, 200, seed=4, integers=frozenset({"batch_size"}))
    assert all(1e-4 <= d["lr"] <= 1e-1 and 16 <= d["batch_size"] <= 256 for d in draws)
    assert all(isinstance(d["batch_size"], int) for d in draws)
    # Log-uniform: about as many draws in each decade.
    decades = [sum(10**k <= d["lr"] < 10 ** (k + 1) for d in draws) for k in (-4, -3, -2)]
    assert min(decades) > 40, decades
    assert all(d["lr"] == float(f"{d['lr']:.4g}") for d in draws)  # readable in tables


def test_grid_crossed_with_the_same_draws():
    trials = trial_overrides({"model": ["mlp", "cnn"]}, {"lr": Range(0.001, 0.01)}, 3, seed=0)
    assert len(trials) == 6
    assert [t["lr"] for t in trials[:3]] == [t["lr"] for t in trials[3:]]
    assert trial_overrides({"model": ["mlp"]}, {}, 0, seed=0) == [{"model": "mlp"}]


def test_the_count_comes_from_the_sizes_and_the_limit_holds_before_building():
    grid = {"a": range(1000), "b": range(1000), "c": range(1000)}
    assert trial_count(grid, 0) == 10**9 and trial_count(grid, 3) == 3 * 10**9
    assert trial_count({}, 4) == 4 and trial_count({"a": [1, 2]}, 0) == 2
    # Building 10**9 dicts would take minutes and all memory: the refusal comes first.
    with pytest.raises(TooManyTrialsError, match="1000000000 trials, more than the limit of 1000"):
        trial_overrides(grid, {}, 0, seed=0, limit=1000)
    assert len(trial_overrides({"a": range(10)}, {"x": Range(0, 1)}, 100, seed=0, limit=1000)) == 1000
