"""The sweep flow's parameter: a base TrainConfig and what to vary, checked before any work."""

from __future__ import annotations

from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.config import ClusterOptions, TrainConfig
from tasks.train.search_space import Range, trial_count, trial_overrides

# Settings a trial may change; the data, folders and registry name stay those of the sweep.
SWEEPABLE = (
    "model",
    "weights",
    "freeze_backbone",
    "image_size",
    "augment",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "scheduler",
    "seed",
)
NUMERIC = ("epochs", "batch_size", "lr", "weight_decay", "seed")
INTEGERS = frozenset(name for name in NUMERIC if TrainConfig.model_fields[name].annotation is int)
MAX_TRIALS = 1000


class SearchRange(BaseModel):
    """A range for random search: uniform, or log-uniform (for learning rates and the like)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    low: float = Field(..., description="Smallest value.")
    high: float = Field(..., description="Largest value.")
    log: bool = Field(False, description="Draw uniformly on a log scale.")


class SweepConfig(ClusterOptions):
    """Train one classifier per combination of settings, in parallel, and register the best."""

    base: TrainConfig = Field(
        default_factory=TrainConfig, description="Settings every trial starts from (train_flow's)."
    )
    grid: dict[str, list[Union[int, float, str]]] = Field(
        default_factory=dict, description="Values to try per setting; the trials are their product."
    )
    random: int = Field(0, ge=0, le=MAX_TRIALS, description="Random-search draws from --space ranges.")
    space: dict[str, SearchRange] = Field(
        default_factory=dict, description="Ranges to draw from per setting, with --random N."
    )

    @model_validator(mode="after")
    def _trials_are_valid(self) -> "SweepConfig":
        for flag, fields in (("--grid", self.grid), ("--space", self.space)):
            for name in fields:
                if name not in SWEEPABLE:
                    raise ValueError(
                        f"{flag} {name}: not a setting a trial can vary; choose from {sweepable_choices()}"
                    )
        both = set(self.grid) & set(self.space)
        if both:
            raise ValueError(f"{sorted(both)} given to both --grid and --space; choose one")
        if bool(self.random) != bool(self.space):
            raise ValueError("--random N and --space go together: N draws from the --space ranges")
        if not self.grid and not self.random:
            raise ValueError(
                "nothing to sweep: give --grid FIELD=V1,V2 and/or --random N --space FIELD=LOW:HIGH"
            )
        for name, values in self.grid.items():
            if not values:
                raise ValueError(f"--grid {name}: give at least one value")
        self._check_trial_count()  # from the sizes, before any value or trial is built
        for name, values in self.grid.items():
            for value in values:
                self._check(f"--grid {name}={value}", {name: value})
        for name, bounds in self.space.items():
            self._check_range(name, bounds)
        self.trial_configs()  # combinations the fields accept one by one may still clash
        return self

    def _check_trial_count(self) -> None:
        count = trial_count(self.grid, self.random)
        if count > MAX_TRIALS:
            factors = [f"--grid {name} ({len(values)} values)" for name, values in self.grid.items()]
            factors += [f"--random {self.random}"] if self.random else []
            raise ValueError(
                f"{count} trials ({' x '.join(factors)}); a sweep runs at most {MAX_TRIALS}: "
                "give fewer values or draws"
            )

    def _check(self, where: str, overrides: dict[str, object]) -> TrainConfig:
        try:
            return TrainConfig.model_validate({**self.base.model_dump(), **overrides})
        except ValidationError as error:
            reason = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {reason}") from None

    def _check_range(self, name: str, bounds: SearchRange) -> None:
        where = f"--space {name}={bounds.low:g}:{bounds.high:g}" + (":log" if bounds.log else "")
        if name not in NUMERIC:
            raise ValueError(f"{where}: {name} is not numeric; sweep it with --grid")
        if not bounds.low < bounds.high:
            raise ValueError(f"{where}: LOW must be below HIGH")
        if bounds.log and bounds.low <= 0:
            raise ValueError(f"{where}: a log range needs LOW > 0")
        for value in (bounds.low, bounds.high):
            self._check(where, {name: round(value) if name in INTEGERS else value})

    @property
    def swept_fields(self) -> list[str]:
        return [*self.grid, *self.space]

    def trial_configs(self) -> list[TrainConfig]:
        """One TrainConfig per trial, in trial order; the random draws are seeded by base.seed."""
        ranges = {name: Range(r.low, r.high, r.log) for name, r in self.space.items()}
        overrides = trial_overrides(self.grid, ranges, self.random, self.base.seed, INTEGERS, MAX_TRIALS)
        return [TrainConfig(**{**self.base.model_dump(), **values}) for values in overrides]


def sweepable_choices() -> str:
    """For help texts: the fields a sweep can vary, with the choices of the categorical ones."""
    parts = []
    for name in SWEEPABLE:
        annotation = TrainConfig.model_fields[name].annotation
        choices = get_args(annotation) if get_origin(annotation) is Literal else ()
        parts.append(f"{name} ({'|'.join(choices)})" if choices else name)
    return ", ".join(parts)
