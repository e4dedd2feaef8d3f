"""The sweep flow's parameter: a base TrainConfig and what to vary, checked before any work; and
its command line, train_flow's flags plus --grid, --random and --space."""

from __future__ import annotations

import argparse
import os
from typing import Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import UserError
from flows.cli import add_fields, build_parser, validate
from flows.config import ClusterOptions, TrainConfig
from tasks.train.launch import capacity, resolve_devices
from tasks.train.search_space import Range, trial_count, trial_overrides
from tasks.train.training import resolve_device

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
_SWEEP_OWN = ("grid", "space")  # flags with a syntax of their own; SweepConfig's others are generated


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
        if self.base.train_on != "local":
            raise ValueError(
                f"--train-on {self.base.train_on} trains one model on a cluster; a sweep's trials run on "
                "its --task-runner: give --task-runner ray --address ADDRESS instead"
            )
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


def parse_sweep_config(
    argv: Optional[list[str]] = None, prog: str = "python flows/sweep_flow.py"
) -> SweepConfig:
    """train_flow's flags set the base config; --grid, --random and --space say what varies."""
    # A sweep trains each trial on its task runner: --address is the runner's cluster, not Ray Train's.
    parser = build_parser(TrainConfig, prog, skip=("train_on", "address"))
    parser.description = SweepConfig.__doc__
    sweep = parser.add_argument_group("sweep", f"Settings a trial can vary: {sweepable_choices()}.")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="Values to try for a setting (repeatable); the trials are the product of all grids.",
    )
    sweep.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="FIELD=LOW:HIGH[:log]",
        help="A range for random search (repeatable), drawn --random N times; ':log' for log-uniform.",
    )
    add_fields(sweep, SweepConfig, skip=("base", *_SWEEP_OWN))
    values = vars(parser.parse_args(argv))
    own = {name: values.pop(name) for name in SweepConfig.model_fields if name in values}
    base = validate(parser, TrainConfig, values)  # what is left: train_flow's flags
    grid = dict(_assignment(parser, "--grid", item) for item in own["grid"])
    space = dict(_assignment(parser, "--space", item) for item in own["space"])
    fields = {
        **own,
        "base": base,
        "grid": {name: text.split(",") for name, text in grid.items()},
        "space": {name: _search_range(parser, name, text) for name, text in space.items()},
    }
    return validate(parser, SweepConfig, fields)


def _assignment(parser: argparse.ArgumentParser, flag: str, item: str) -> tuple[str, str]:
    """'batch-size=32,64' -> ('batch_size', '32,64')."""
    name, equals, value = item.partition("=")
    if not equals or not name.strip() or not value.strip():
        parser.error(f"{flag} {item!r}: expected FIELD=VALUE")
    return name.strip().replace("-", "_"), value.strip()


def _search_range(parser: argparse.ArgumentParser, name: str, text: str) -> SearchRange:
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError
        return SearchRange(low=float(parts[0]), high=float(parts[1]), log=len(parts) == 3)
    except ValueError:
        parser.error(f"--space {name}={text}: expected LOW:HIGH or LOW:HIGH:log with numbers")
    raise AssertionError("unreachable: parser.error exits")


class OversubscribedError(UserError, ValueError):
    """The sweep's trials at once, each in --devices processes, need more than this machine has."""


def check_machine_fits(config: SweepConfig) -> None:
    """On this machine (any runner without --address), the trials at once times each trial's
    processes must not outnumber the CPUs (on CPU) or GPUs (on CUDA)."""
    if config.address or config.base.devices == "1":
        return  # a cluster's workers are the cluster's to size
    device = resolve_device(config.base.device)
    devices = resolve_devices(config.base.devices, device)
    at_once = min(config.max_parallel or os.cpu_count() or 1, trial_count(config.grid, config.random))
    have, what = capacity(device)
    if at_once * devices > have:
        limit = "" if config.max_parallel else " (by default, one per CPU)"
        raise OversubscribedError(
            f"--task-runner {config.task_runner} runs {at_once} trials at once{limit}, each in --devices "
            f"{devices} processes: {at_once * devices} training processes for this machine's {have} "
            f"{what}; give --max-parallel {max(1, have // devices)} or fewer --devices"
        )
