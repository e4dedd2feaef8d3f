"""The trials of a sweep: the product of grids, crossed with seeded random draws from ranges."""

from __future__ import annotations

import itertools
import math
import random
from typing import Mapping, NamedTuple, Optional, Sequence, Sized


class Range(NamedTuple):
    """A numeric range to draw from, uniformly or on a log scale."""

    low: float
    high: float
    log: bool = False


def grid_points(grid: Mapping[str, Sequence[object]]) -> list[dict[str, object]]:
    """Every combination of the grids' values, the first field varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def random_draws(
    space: Mapping[str, Range], count: int, seed: int, integers: frozenset[str] = frozenset()
) -> list[dict[str, object]]:
    """`count` seeded draws, one value per field; `integers` are rounded, floats kept to 4 digits."""
    rng = random.Random(seed)
    draws = []
    for _ in range(count):
        draw: dict[str, object] = {}
        for field, (low, high, log) in space.items():
            value = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
            draw[field] = round(value) if field in integers else float(f"{value:.4g}")
        draws.append(draw)
    return draws


class TooManyTrialsError(ValueError):
    """A sweep would have more trials than its limit."""


def trial_count(grid: Mapping[str, Sized], count: int) -> int:
    """How many trials trial_overrides makes, from the sizes alone (nothing is built)."""
    return math.prod(len(values) for values in grid.values()) * max(count, 1)


def trial_overrides(
    grid: Mapping[str, Sequence[object]],
    space: Mapping[str, Range],
    count: int,
    seed: int,
    integers: frozenset[str] = frozenset(),
    limit: Optional[int] = None,
) -> list[dict[str, object]]:
    """Each grid point with each random draw (the same draws for every point, so they pair up);
    more than `limit` trials raise TooManyTrialsError before any is built."""
    total = trial_count(grid, count)
    if limit is not None and total > limit:
        raise TooManyTrialsError(f"{total} trials, more than the limit of {limit}")
    draws = random_draws(space, count, seed, integers) if count else [{}]
    return [{**point, **draw} for point in grid_points(grid) for draw in draws]
