"""The search space: YAML data mapping a dotted config field to one distribution.

    learner.lr:                 {loguniform: [1.0e-5, 1.0e-3]}   # [low, high], low > 0, sampled on a log scale
    algorithm.clip_range:       {uniform: [0.1, 0.3]}            # [low, high]
    algorithm.name:             {choice: [grpo, rloo]}           # one of the values, drawn per trial
    rollout.samples_per_prompt: {grid: [4, 8]}                   # every value, once per --num-samples draw

Any field `rlpipe config --doc` lists can be searched. Integer fields sample integers (uniform ->
`tune.randint`, loguniform -> `tune.lograndint`, `high` inclusive). Every bound and every listed value is
applied to the base config and validated by `load_config` up front, so a trial never fails on a value
the space allowed. `grid` multiplies the trial count: Tune runs the full grid for each of --num-samples.

PBT mutates the same fields: continuous values are multiplied by 0.8 or 1.2 (or resampled) and then
clipped back into [low, high] by `SearchSpace.clip`; choice and grid values move to a neighbouring value.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config import ConfigError, RunConfig, load_config, set_dotted
from pipeline.errors import UserInputError

DISTRIBUTIONS = ("choice", "grid", "loguniform", "uniform")


class SpaceError(UserInputError):
    """The search space names an unknown field or distribution, or has bad bounds or values."""


@dataclass(frozen=True)
class Dimension:
    field: str             # dotted config field, e.g. "learner.lr"
    distribution: str      # one of DISTRIBUTIONS
    values: tuple          # (low, high) for uniform/loguniform; the listed values for choice/grid
    integer: bool          # an int config field: sample integers

    def domain(self) -> Any:
        """The Tune search object for the Tuner's param_space."""
        from ray import tune

        if self.distribution == "choice":
            return tune.choice(list(self.values))
        if self.distribution == "grid":
            return tune.grid_search(list(self.values))
        low, high = self.values
        if self.integer:  # Tune's integer upper bounds are exclusive; ours are inclusive
            return (tune.lograndint if self.distribution == "loguniform" else tune.randint)(low, high + 1)
        return (tune.loguniform if self.distribution == "loguniform" else tune.uniform)(low, high)

    def mutation(self) -> Any:
        """What PBT perturbs: a list (moved to a neighbour) for choice/grid, else the domain."""
        return list(self.values) if self.distribution in ("choice", "grid") else self.domain()

    def to_spec(self) -> dict:
        return {self.distribution: list(self.values)}


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    @property
    def fields(self) -> list[str]:
        return [d.field for d in self.dimensions]

    def param_space(self) -> dict:
        """Flat {dotted field: Tune domain}; trial configs come back with the same dotted keys."""
        return {d.field: d.domain() for d in self.dimensions}

    def mutations(self) -> dict:
        return {d.field: d.mutation() for d in self.dimensions}

    def clip(self, config: dict) -> dict:
        """PBT's `custom_explore_fn`: put perturbed continuous values back inside [low, high]."""
        out = dict(config)
        for d in self.dimensions:
            if d.distribution in ("uniform", "loguniform") and d.field in out:
                low, high = d.values
                value = min(max(out[d.field], low), high)
                out[d.field] = int(round(value)) if d.integer else float(value)
        return out

    def to_spec(self) -> dict:
        """The YAML shape this space was parsed from (stored with the sweep for --resume)."""
        return {d.field: d.to_spec() for d in self.dimensions}


def _field_type(dotted: str, where: str) -> type:
    """The value type of a dotted RunConfig field; SpaceError naming the valid fields otherwise."""
    hints = typing.get_type_hints(RunConfig)
    section, _, name = dotted.partition(".")
    if section not in hints:
        raise SpaceError(f"{where}: unknown config field {dotted!r}; fields are section.name with sections "
                         f"{', '.join(hints)}")
    section_hints = typing.get_type_hints(hints[section])
    if name not in section_hints:
        valid = ", ".join(f.name for f in dataclasses.fields(hints[section]))
        raise SpaceError(f"{where}: unknown config field {dotted!r}; valid fields in {section}: {valid}")
    tp = section_hints[name]
    concrete = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]  # Optional[float] -> float
    return typing.get_origin(concrete[0]) or concrete[0]


def _number(value: Any) -> float | None:
    """A YAML number (1e-5 without a dot reads as a string in YAML 1.1), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_against_config(field: str, value: Any, base: dict, where: str) -> None:
    """Apply one value to the base config; the config's own validation decides whether it is allowed."""
    tree = yaml.safe_load(yaml.safe_dump(base))  # deep copy that keeps only plain data
    set_dotted(tree, field, value)
    try:
        load_config(base=tree)
    except ConfigError as err:
        raise SpaceError(f"{where}: {field} value {value!r} fails the config's validation: {err}") from None


def _parse_dimension(field: str, spec: Any, base: dict, where: str) -> Dimension:
    kind = _field_type(field, where)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: {field}: expected one distribution like {{loguniform: [1.0e-5, 1.0e-3]}}, "
                         f"got {spec!r}; distributions: {', '.join(DISTRIBUTIONS)}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: {field}: unknown distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")
    integer = kind is int
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}: {field}: {dist} needs a non-empty list of values, got {args!r}")
        values = tuple(args)
    else:
        if kind not in (int, float):
            raise SpaceError(f"{where}: {field} is a {kind.__name__} field; {dist} needs a number field, use "
                             "choice or grid")
        bounds = [_number(a) for a in args] if isinstance(args, list) else []
        if len(bounds) != 2 or None in bounds:
            raise SpaceError(f"{where}: {field}: {dist} needs two numbers [low, high], got {args!r}")
        low, high = bounds
        if low >= high:
            raise SpaceError(f"{where}: {field}: {dist} bounds need low < high, got [{low}, {high}]")
        if dist == "loguniform" and low <= 0:
            raise SpaceError(f"{where}: {field}: loguniform needs low > 0 (it samples log(value)), got {low}")
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise SpaceError(f"{where}: {field} is an integer field; give integer bounds, got [{low}, {high}]")
        values = (int(low), int(high)) if integer else (float(low), float(high))
    for value in values:
        _check_against_config(field, value, base, where)
    return Dimension(field, dist, values, integer)


def parse_space(spec: Any, base: RunConfig, where: str = "search space") -> SearchSpace:
    """Validate `spec` ({dotted field: {distribution: args}}) against `base`; raises one SpaceError."""
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(f"{where}: expected a mapping of config fields to distributions, e.g. "
                         f"'learner.lr: {{loguniform: [1.0e-5, 1.0e-3]}}', got {spec!r}")
    tree = base.to_dict()
    return SearchSpace(tuple(_parse_dimension(str(field), args, tree, where) for field, args in spec.items()))


def load_space(path: str, base: RunConfig) -> SearchSpace:
    try:
        with open(path) as fh:
            spec = yaml.safe_load(fh)
    except FileNotFoundError:
        raise SpaceError(f"search space {path!r} does not exist; see tuning/default_space.yaml") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"search space {path}: not valid YAML ({err})") from None
    return parse_space(spec, base, where=f"search space {path}")
