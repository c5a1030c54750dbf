"""Checks run before a run directory exists, so that bad input writes no half-made run.

Each failure is one `InputError` naming the thing (field, file, column, module) and the fix.
"""
from __future__ import annotations

import inspect
import os

from pipeline.config import RunConfig
from pipeline.errors import UserInputError


class InputError(UserInputError):
    """Bad user input found before the run started."""


def check_model_path(path: str) -> None:
    from pipeline.models import ModelLoadError

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"model.path {path!r} is not a Hugging Face model folder (no config.json); pass a "
                             "folder written by save_pretrained, or build the demo model with `rlpipe warmstart`")
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"model.path {path!r} does not exist; pass a model folder or a hub name "
                             "(`rlpipe warmstart` builds the demo model at runs/demo/warm)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError for the many ways this fails
        raise ModelLoadError(f"model.path {path!r} cannot be loaded as a Hugging Face model ({type(err).__name__}:"
                             f" {str(err).splitlines()[0]}); pass a local model folder (no downloads happen "
                             "offline)") from None


def required_columns(reward_fns: list) -> set[str]:
    """Dataset columns the reward functions take as required keyword parameters (e.g. `answer`)."""
    needed = set()
    for fn in reward_fns:
        for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
            if i < 2 or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
                continue
            needed.add(name)
    return needed


def preflight(cfg: RunConfig):
    """Validate model, data and reward functions. Returns (train table, eval table or None, composer)."""
    from pipeline.data import read_prompt_table
    from pipeline.rewards import RewardComposer

    check_model_path(cfg.model.path)
    if cfg.model.critic_path:
        check_model_path(cfg.model.critic_path)
    composer = RewardComposer(cfg.reward.functions, cfg.reward.weights, cfg.reward.failed_reward)
    columns = required_columns(composer.fns)
    train = read_prompt_table(cfg.data.train_path, (cfg.data.prompt_column, *sorted(columns)))
    evaluation = None
    if cfg.data.eval_path:
        evaluation = read_prompt_table(cfg.data.eval_path, (cfg.data.prompt_column, "answer"))
    return train, evaluation, composer
