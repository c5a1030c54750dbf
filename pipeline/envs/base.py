"""The environment interface: one instance per episode, Gymnasium-shaped, stepped by the generator's agent loop.

    env = factory()                       # a fresh instance for every episode: no state crosses episodes
    observation = env.reset(row, seed)    # the task as the model first sees it: text (or chat messages)
    result = env.step(action_text)        # StepResult(observation, reward, done, truncated, info)
    env.close()

`row` is the dataset row (prompt column plus every other column). `step` gets the text the model wrote this turn
(up to and including a stop string, when the environment names `stop`); its `observation` is the text appended
as the next turn ("" when the episode is done). `reward` is this turn's: the agent loop puts it on the turn's
last sampled token. `reset`, `step` and `close` may be `async def`. A single-turn task is the one-step case
(`RewardFunctionEnv`: reset gives the prompt, step scores the completion with the reward functions and is done).

Environments are named in config like reward functions: a registered name, or `module:Class` importable from
the working directory (any callable returning an instance).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union

from pipeline.errors import UserInputError
from pipeline.registry import Registry

Observation = Union[str, list]     # text, or chat messages [{role, content}]


@dataclass
class StepResult:
    observation: Observation = ""     # appended to the context as the next turn; "" = nothing
    reward: float = 0.0               # this turn's reward
    done: bool = False                # the task ended (solved, failed, answered)
    truncated: bool = False           # the environment cut the episode short (its own limit)
    info: dict = field(default_factory=dict)   # logged counters: tool_calls, tool_errors, ...


class Environment(Protocol):
    stop: list[str]                   # optional: strings that end a turn (a tool call's closing tag)

    def reset(self, row: dict, seed: int) -> Observation: ...

    def step(self, action: str) -> StepResult: ...

    def close(self) -> None: ...


ENVIRONMENTS: Registry[Callable[[], Any]] = Registry("environment")


class EnvironmentLoadError(UserInputError):
    """An environment name that is neither registered nor importable, or not an environment."""


def resolve_environment(spec: str) -> Callable[[], Any]:
    """The factory `spec` names: a registered environment, or `module:Class` from the working directory."""
    factory = ENVIRONMENTS.resolve(spec, EnvironmentLoadError, "module:Class")
    missing = [m for m in ("reset", "step") if not callable(getattr(factory, m, None))]
    if inspect.isclass(factory) and missing:
        raise EnvironmentLoadError(f"environment {spec!r}: class {factory.__name__} has no {' or '.join(missing)} "
                                   "method; an environment has reset(row, seed) and step(action) -> StepResult")
    return factory


def as_step_result(value: Any) -> StepResult:
    """A StepResult, or Gymnasium's 5-tuple (observation, reward, done, truncated, info), as a StepResult."""
    if isinstance(value, StepResult):
        return value
    if isinstance(value, tuple) and len(value) == 5:
        observation, reward, done, truncated, info = value
        return StepResult(observation, float(reward), bool(done), bool(truncated), dict(info or {}))
    raise TypeError(f"step returned {type(value).__name__}; return a StepResult or (observation, reward, done, "
                    "truncated, info)")


@ENVIRONMENTS.register("reward_functions")
class RewardFunctionEnv:
    """The single-turn task as an environment: the prompt is the observation, the completion is scored by the
    reward functions (`reward.functions`' names, weighted) on the row's columns, and the episode is done."""

    def __init__(self, functions: tuple[str, ...] = ("exact_match",), weights: Optional[list[float]] = None,
                 prompt_column: str = "prompt"):
        from pipeline.rewards.functions import RewardComposer

        self.composer = RewardComposer(list(functions), weights)
        self.prompt_column = prompt_column
        self.row: dict = {}

    def reset(self, row: dict, seed: int) -> Observation:
        self.row = row
        return row[self.prompt_column]

    def step(self, action: str) -> StepResult:
        columns = {k: [v] for k, v in self.row.items() if k != self.prompt_column}
        scored = self.composer.score([self.row[self.prompt_column]], [action], columns)
        return StepResult(reward=scored.scores[0], done=True)

    def close(self) -> None:
        pass
