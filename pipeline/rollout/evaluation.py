"""Held-out evaluation: greedy exact match, the one accuracy number the demo reports.

One definition of "correct" for every caller (RL's generators, supervised fine-tuning, `rlpipe eval`): the
`exact_match` reward function.
"""
from __future__ import annotations

import torch

from pipeline.rollout.generation import neutral_generation_config, sample_completions
from pipeline.data.prompt_format import PromptFormat
from pipeline.rewards.functions import exact_match


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 250,
                       prompt_format: PromptFormat | None = None) -> list[str]:
    """Greedy (do_sample=False) completion text for each prompt, special tokens removed.

    The model's own generation_config (min_new_tokens, suppressed tokens, ...) is set aside for the call and
    put back after it: a model being trained keeps the config it will be saved with.
    """
    was_training, saved = model.training, model.generation_config
    model.eval()
    model.generation_config = neutral_generation_config(model, tokenizer)
    try:
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            out += sample_completions(model, tokenizer, chunk, max_new_tokens, do_sample=False,
                                      prompt_format=prompt_format)["completions"]
        return out
    finally:
        model.generation_config = saved
        model.train(was_training)


def exact_match_accuracy(model, tokenizer, prompts: list, answers: list[str], max_new_tokens: int,
                         batch_size: int = 250, prompt_format: PromptFormat | None = None) -> float:
    """Fraction of prompts whose greedy completion is an exact match of the answer (`exact_match`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, prompt_format)
    return sum(exact_match(prompts, completions, answer=answers)) / len(prompts)


__all__ = ["greedy_completions", "exact_match_accuracy"]
