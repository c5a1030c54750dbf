"""Held-out evaluation: greedy exact match, the one accuracy number the demo reports."""
from __future__ import annotations

import torch

from pipeline.models import sample_completions


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int,
                       batch_size: int = 250) -> list[str]:
    """Greedy (do_sample=False) completion text for each prompt, special tokens removed."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            out += sample_completions(model, tokenizer, chunk, max_new_tokens, do_sample=False)["completions"]
        return out
    finally:
        model.train(was_training)


def exact_match_accuracy(model, tokenizer, prompts: list[str], answers: list[str],
                         max_new_tokens: int, batch_size: int = 250) -> float:
    """Fraction of prompts whose stripped greedy completion equals the stripped answer string."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = sum(c.strip() == str(a).strip() for c, a in zip(completions, answers))
    return hits / len(prompts)


__all__ = ["greedy_completions", "exact_match_accuracy"]
