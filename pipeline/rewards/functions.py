"""Reward functions: pure, batched, chosen by name or `module:function`.

A reward function is `(prompts: list[str], completions: list[str], **columns) -> list[float | None]`,
where `columns` are the dataset's extra columns for the same rows (e.g. `answer`), and `None` means
"cannot score this sample". Functions must not print or keep state between calls.

`RewardComposer` turns a list of such functions into one score per sample. A function that raises on
the batch is retried sample by sample, so one bad sample fails alone: its score becomes
`failed_reward` and it is counted in the `reward/failed` metric, while the run goes on.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pipeline.errors import UserInputError
from pipeline.registry import Registry

RewardFn = Callable[..., list]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")

_NUMBER = re.compile(r"^\s*(-?\d+)\s*$")
_EXPRESSION = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*$")


@REWARD_FUNCTIONS.register("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: Sequence, **_) -> list[float]:
    """1.0 when the stripped completion equals the `answer` column as a string, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


@REWARD_FUNCTIONS.register("arithmetic")
def arithmetic(prompts: list[str], completions: list[str], **_) -> list[Optional[float]]:
    """A verifier that needs no labels: evaluates the prompt `a+b=` itself. None if the prompt is not one."""
    out: list[Optional[float]] = []
    for prompt, completion in zip(prompts, completions):
        m = _EXPRESSION.match(prompt)
        if m is None:
            out.append(None)
            continue
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        truth = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(float(completion.strip() == str(truth)))
    return out


@REWARD_FUNCTIONS.register("digit_match")
def digit_match(prompts: list[str], completions: list[str], answer: Sequence, **_) -> list[float]:
    """Share of digit positions (aligned from the right, over the longer of completion and answer) that
    match the `answer` column: a dense, partial-credit verifier; 1.0 exactly when `exact_match` is."""
    out = []
    for c, a in zip(completions, answer):
        c, a = c.strip(), str(a).strip()
        width = max(len(c), len(a), 1)
        c, a = c.rjust(width), a.rjust(width)
        out.append(sum(x == y for x, y in zip(c, a)) / width)
    return out


@REWARD_FUNCTIONS.register("format_number")
def format_number(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the completion is a bare integer (a shaping term for the arithmetic task)."""
    return [float(_NUMBER.match(c) is not None) for c in completions]


class RewardFailure(UserInputError):
    """Every sample's reward failed for `reward.max_failed_steps` steps in a row: the reward code is broken."""


class RewardLoadError(UserInputError):
    """A reward function name that is neither registered nor importable."""


def resolve_reward_fn(spec: str) -> RewardFn:
    """A registered name, or `package.module:function` importable from the working directory."""
    fn = REWARD_FUNCTIONS.resolve(spec, RewardLoadError, "module:function")
    params = inspect.signature(fn).parameters
    if len(params) < 2:
        raise RewardLoadError(f"reward function {spec!r} must accept (prompts, completions, **columns)")
    return fn


@dataclass
class ScoredShard:
    scores: list[float]        # (n,) weighted sum; failed samples get failed_reward
    failed: list[bool]         # (n,) some function raised or returned None/NaN for this sample
    per_function: dict         # name -> (n,) raw values (None where failed): logged as reward/fn/<name>
    errors: dict = field(default_factory=dict)   # name -> the first failure of that function, as text


def merge_scored_shards(n: int, shards: list[tuple[list[int], ScoredShard]]) -> ScoredShard:
    """The step's N samples from scorer shards (sample indices, their scores), in sample order. Raises
    unless every sample was scored exactly once (a lost or resent shard must neither drop nor double one)."""
    seen = [0] * n
    scores, failed = [0.0] * n, [False] * n
    per_function: dict[str, list] = {}
    errors: dict[str, str] = {}
    for index, shard in shards:
        for name, error in shard.errors.items():
            errors.setdefault(name, error)
        for j, i in enumerate(index):
            seen[i] += 1
            scores[i], failed[i] = shard.scores[j], shard.failed[j]
            for name, values in shard.per_function.items():
                per_function.setdefault(name, [None] * n)[i] = values[j]
    wrong = [i for i, count in enumerate(seen) if count != 1]
    if wrong:
        raise RuntimeError(f"samples {wrong[:10]} were scored {[seen[i] for i in wrong[:10]]} times; expected once each")
    return ScoredShard(scores=scores, failed=failed, per_function=per_function, errors=errors)


def reward_model_names(models: Sequence[dict]) -> list[str]:
    """`rm/<name>` per reward model: its `name`, else its folder's name (the run's name for a `<run>/model`
    folder written by `rlpipe reward-model`), numbered where two would be the same."""
    import os

    names = []
    for m in models:
        path = os.path.normpath(m["path"])
        base = m.get("name") or (os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "model"
                                 else os.path.basename(path))
        name = f"rm/{base}"
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


class RewardComposer:
    """Weighted sum of reward functions with per-sample failure isolation."""

    def __init__(self, specs: list[str], weights: Optional[list[float]] = None, failed_reward: float = 0.0,
                 models: Sequence[dict] = (), device: str = "cpu"):
        """specs/weights: reward functions; models: `reward.models` entries, each loaded here, once, as a
        `RewardModelFunction` on `device` and named by `reward_model_names`."""
        self.specs = list(specs)
        self.fns = [resolve_reward_fn(s) for s in self.specs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.fns)
        if models:
            from pipeline.rewards.models import RewardModelFunction

            for name, m in zip(reward_model_names(models), models):
                self.specs.append(name)
                self.fns.append(RewardModelFunction(m["path"], m.get("batch_size", 64), device,
                                                    m.get("dtype", "float32")))
                self.weights.append(float(m.get("weight", 1.0)))
        self.failed_reward = failed_reward

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> ScoredShard:
        n = len(prompts)
        total = [0.0] * n
        failed = [False] * n
        per_function, errors = {}, {}
        for spec, fn, w in zip(self.specs, self.fns, self.weights):
            values, error = self._call(fn, prompts, completions, columns)
            per_function[spec] = values
            if error is not None:
                errors[spec] = error
            for i, v in enumerate(values):
                if v is None:
                    failed[i] = True
                else:
                    total[i] += w * v
        scores = [self.failed_reward if f else s for s, f in zip(total, failed)]
        return ScoredShard(scores=scores, failed=failed, per_function=per_function, errors=errors)

    @staticmethod
    def _call(fn: RewardFn, prompts, completions, columns) -> tuple[list[Optional[float]], Optional[str]]:
        """(one value or None per sample, the first failure as text or None). A function that raises is retried
        one sample at a time, so only the samples it fails on fail; one that returns the wrong number of values
        failed on the whole batch (which value belongs to which sample is unknown)."""
        n = len(prompts)
        try:
            values = list(fn(prompts, completions, **columns))
        except Exception as err:  # user code: isolate the failing samples by retrying one at a time
            error = f"{type(err).__name__}: {err}"
            values = []
            for i in range(n):
                try:
                    one = list(fn(prompts[i:i + 1], completions[i:i + 1],
                                  **{k: v[i:i + 1] for k, v in columns.items()}))
                    values.append(one[0] if len(one) == 1 else None)
                except Exception:
                    values.append(None)
            return [_finite_or_none(v) for v in values], error
        if len(values) != n:
            return [None] * n, f"returned {len(values)} values for {n} samples (one per sample expected)"
        checked = [_finite_or_none(v) for v in values]
        bad = next((v for v, c in zip(values, checked) if c is None and v is not None), None)
        return checked, (f"returned {bad!r:.60}, not a finite number" if bad is not None else None)


class RunningMoments:
    """Mean and standard deviation of every value seen so far, updated a batch at a time (Chan et al.'s
    parallel update, as OpenRLHF's reward normalisation keeps them); its state is JSON for checkpoints."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: "torch.Tensor") -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.double().mean())
        batch_m2 = float(((x.double() - batch_mean) ** 2).sum())
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1))

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(scores: "torch.Tensor", failed: "torch.Tensor", moments: Optional[RunningMoments],
                 clip: Optional[float]) -> "torch.Tensor":
    """(N,) scores -> whitened by `moments` after adding the step's successful scores to them (if given), then
    clipped to [-clip, clip] (if given): reward normalisation and DeepSpeed-Chat's clip_reward_value."""
    if moments is not None:
        moments.update(scores[~failed])
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def _finite_or_none(v) -> Optional[float]:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
