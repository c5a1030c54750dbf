"""Generation backends: the small interface a rollout worker samples through.

`hf` wraps transformers `generate`. A faster engine (vLLM, SGLang, a CUDA-graph decoder) plugs in by
registering a class with the same three methods.
"""
from __future__ import annotations

from typing import Protocol

import torch

from pipeline.registry import Registry


class GenerationBackend(Protocol):
    def sample(self, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
               top_k: int, seed: int) -> dict:
        """prompt_ids (n,P), prompt_mask, completion_ids (n,T), completion_mask, logprobs (n,T), completions."""

    def greedy(self, prompts: list[str], *, max_new_tokens: int) -> list[str]:
        """Greedy completions as text (evaluation)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights in place."""


GENERATION_BACKENDS: Registry[type] = Registry("generation backend")


@GENERATION_BACKENDS.register("hf")
class HFGenerateBackend:
    """transformers `generate` with a KV cache; log-probs from the raw logits at the sampling temperature."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.no_grad()
    def sample(self, prompts, *, max_new_tokens, temperature, top_p, top_k, seed):
        from pipeline.models import sample_completions

        return sample_completions(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, do_sample=True,
                                  generator_seed=seed)

    @torch.no_grad()
    def greedy(self, prompts, *, max_new_tokens):
        from pipeline.models import sample_completions

        out = sample_completions(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 do_sample=False)
        return out["completions"]

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
