"""Generation backends: the small interface a rollout generator samples through, and transformers' one.

`hf` wraps transformers `generate`. A faster engine (vLLM, SGLang, a CUDA-graph decoder) plugs in by
registering a class with the same methods (in its own module, imported where the room is assembled:
`pipeline/rollout/__init__.py`); the generator never touches the model itself, so where the
weights live (a torch module here, an engine's workers elsewhere) is the backend's business.

On-policy sampling: what a model folder's `generation_config` carries (min_p, typical_p, epsilon/eta
cutoffs, min_new_tokens, suppressed or forced tokens, repetition penalties, ...) would make the sampled
tokens follow another distribution than the one whose log-probs we record, and no metric would show it.
transformers merges such fields into ANY generation config passed to `generate` (every field left at its
default takes the model's value), so the backend replaces the model's own `generation_config` with a clean
one holding only the special-token ids, and passes every sampling setting explicitly.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from pipeline.data.prompt_format import PromptFormat, pad_left
from pipeline.registry import Registry


class GenerationBackend(Protocol):
    @classmethod
    def load(cls, model_cfg, prompt_format: PromptFormat, device: str, seed: int = 0,
             engine_cfg=None, sampling=None) -> "GenerationBackend":
        """The backend holding the policy folder `model_cfg.path` (the registry's constructor). sampling: the
        run's RolloutConfig, for an engine that must know its sampling settings when it starts."""

    def sample(self, prompts: list, *, max_new_tokens: int, temperature: float, top_p: float,
               top_k: int, seed: int) -> dict:
        """prompt_ids (n,P), prompt_mask, completion_ids (n,T), completion_mask, logprobs (n,T) float32 of
        the sampled tokens under the untruncated policy at `temperature`, log softmax(logits / T), what the
        learner computes, also when top_p / top_k truncate what is sampled from (every backend means this;
        one that cannot must refuse the settings), completions (decoded text), prompt_texts (what the model
        was prompted with, after any chat template)."""

    def sample_turns(self, contexts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                     top_k: int, seed: int, stop: Sequence[str] = ()) -> list[tuple[list[int], list[float], str]]:
        """Token-in/token-out, for the agent loop: each context (token ids) continued by sampled ids, cut by
        `end_turn` at EOS or a stop string -> (ids, log-probs as in `sample`, finish "stop" | "length")."""

    def greedy(self, prompts: list, *, max_new_tokens: int) -> list[str]:
        """Greedy completions as text (evaluation)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights in place."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the backend actually holds (read back for the checksum, never what was sent)."""


GENERATION_BACKENDS: Registry[type] = Registry("generation backend")


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's generation config (chat models list several, e.g. the
    end-of-text and the end-of-turn token), else the tokenizer's EOS."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def neutral_generation_config(model, tokenizer):
    """A generation config with the special-token ids and nothing else (see the module docstring)."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=eos_token_ids(getattr(model, "generation_config", None), tokenizer),
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def decode_completions(tokenizer, completion_ids: torch.Tensor) -> list[str]:
    """Completion text of exactly the tokens trained on: special tokens dropped, and no
    `clean_up_tokenization_spaces` ("a , b ." stays as generated; GPT-2/BERT-era tokenizers ship the
    clean-up on, and a reward would then judge text the model did not write)."""
    return tokenizer.batch_decode(completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class SampledTokenLogprobs:
    """A logits processor that records log softmax(raw logits / T) of each sampled token while `generate`
    runs, keeping one (n, V) step at a time instead of the (n, T, V) logits `output_logits` would hold.

    transformers runs processors given to `generate` before its temperature / top-k / top-p warpers, so
    the scores seen here are the raw ones: the recorded log-probs are the untruncated policy's, the same
    quantity `completion_forward` computes. Step t's distribution is kept until step t+1 shows which token
    was sampled from it; `finish` takes the last one.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: Optional[torch.Tensor] = None     # (n, V) log-probs of the step before
        self.steps: list[torch.Tensor] = []               # T x (n,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor, generated: int) -> torch.Tensor:
        """(n, generated) float32 log-probs of the generated tokens."""
        if generated and self.previous is not None and len(self.steps) < generated:
            self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0, device=sequences.device)
        return torch.stack(self.steps[:generated], dim=1)


class StopOnStrings:
    """A stopping criterion ending each row once its generated text ends in one of `stop`. transformers' own
    StopStringCriteria maps the vocabulary through a probe string the tokenizer must be able to encode, which
    a character tokenizer without letters cannot; this decodes the tail of each row instead."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len
        self.tail = max(len(s) for s in self.stop) + 8      # tokens enough to spell the longest stop string

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:][:, -self.tail:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return torch.tensor([any(t.endswith(s) for s in self.stop) for t in texts], device=input_ids.device)


def _generate(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
              do_sample: bool, sampling: dict, seed: Optional[int], stop: Sequence[str] = ()):
    """One `generate` call on left-padded prompts (n, P) -> (sequences (n, P+T'), the log-prob recorder or None).
    `stop`: strings that end a row's generation early (transformers' StopStringCriteria)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = prompt_ids.device
    eos_ids = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
    recorder = SampledTokenLogprobs(sampling["temperature"]) if do_sample else None
    extra = dict(stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_ids.shape[1])])) \
        if stop else {}
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        sequences = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), max_new_tokens=max_new_tokens,
            do_sample=do_sample, use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            **(sampling if do_sample else {}), **extra)
    model.train(was_training)
    return sequences, recorder


def end_turn(ids: list[int], logprobs: list[float], eos_ids: Sequence[int], stop: Sequence[str], decode,
             max_new_tokens: int) -> tuple[list[int], list[float], str]:
    """A sampled turn cut where it ends: after the first EOS ("stop"), else after the first token whose text
    completes a stop string ("stop"), else as sampled ("length" when it used its max_new_tokens, "stop"
    otherwise). Tokens after the end were sampled past it (a batch's other rows kept going) and are dropped;
    those kept are exactly the sampled ones with their own log-probs. decode: ids -> text."""
    for k, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:k + 1], logprobs[:k + 1], "stop"
    if stop and any(s in decode(ids) for s in stop):
        for k in range(1, len(ids) + 1):
            if any(s in decode(ids[:k]) for s in stop):
                return ids[:k], logprobs[:k], "stop"
    return ids, logprobs, "length" if len(ids) >= max_new_tokens else "stop"


@torch.no_grad()
def sample_turns(model, tokenizer, contexts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, seed: Optional[int], stop: Sequence[str] = ()) -> list[tuple[list[int], list[float], str]]:
    """Token-in/token-out sampling (the agent loop's turn): each context is a list of token ids, continued by
    up to max_new_tokens sampled tokens, cut by `end_turn`. -> (ids, log-probs, finish) per context."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in pad_left(contexts, tokenizer.pad_token_id))
    sequences, recorder = _generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, True,
                                    dict(temperature=temperature, top_p=top_p, top_k=top_k), seed, stop)
    generated = sequences.shape[1] - prompt_ids.shape[1]
    logprobs = recorder.finish(sequences, generated)
    eos_ids = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [end_turn(sequences[i, prompt_ids.shape[1]:].tolist(), logprobs[i].tolist(), eos_ids, stop, decode,
                     max_new_tokens) for i in range(len(contexts))]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
                       generator_seed: Optional[int] = None, prompt_format: Optional[PromptFormat] = None) -> dict:
    """Generate one completion per prompt with HF `generate` (the HF rollout backend).

    `model.generation_config` should be neutral (`neutral_generation_config`); the backend sets it once.
    Returns prompt_ids, prompt_mask (n, P); completion_ids, completion_mask (n, T) where T is the longest
    completion, the mask covers generated tokens up to and including EOS, and later tokens are pad;
    logprobs (n, T) float32 = log softmax(raw logits / temperature) of the sampled tokens (with top_p < 1 or
    top_k > 0 the sampler truncated that distribution: these are the untruncated policy's log-probs; zeros
    for greedy); completions: decoded text; prompt_texts: the prompts after any chat template.
    """
    device = next(model.parameters()).device
    prompt_format = prompt_format or PromptFormat(tokenizer)
    prompt_ids, prompt_mask, prompt_texts = prompt_format.encode(prompts)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    eos_ids = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
    sequences, recorder = _generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, do_sample,
                                    dict(temperature=temperature, top_p=top_p, top_k=top_k), generator_seed)
    completion_ids = sequences[:, prompt_ids.shape[1]:]                          # (n, T)
    # Mask: tokens up to and including the first EOS. `before_eos` counts EOS tokens strictly before t.
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device))
    before_eos = is_eos.long().cumsum(-1) - is_eos.long()
    completion_mask = before_eos == 0
    T = int(completion_mask.sum(-1).max().item()) if completion_mask.numel() else 0
    completion_mask = completion_mask[:, :T]
    completion_ids = completion_ids[:, :T].masked_fill(~completion_mask, tokenizer.pad_token_id)
    if recorder is not None:
        logprobs = recorder.finish(sequences, sequences.shape[1] - prompt_ids.shape[1])[:, :T]
        logprobs = logprobs.masked_fill(~completion_mask, 0.0)
    else:
        logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=device)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask, "logprobs": logprobs,
        "completions": decode_completions(tokenizer, completion_ids),
        "prompt_texts": prompt_texts,
    }


@GENERATION_BACKENDS.register("hf")
class HFGenerateBackend:
    """transformers `generate` with a KV cache on a torch module the backend owns."""

    def __init__(self, model, tokenizer, prompt_format: Optional[PromptFormat] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat(tokenizer)
        self.model.generation_config = neutral_generation_config(model, tokenizer)

    @classmethod
    def load(cls, model_cfg, prompt_format: PromptFormat, device: str, seed: int = 0, engine_cfg=None,
             sampling=None):
        """The policy folder as a torch module on `device`, in model.dtype, in eval mode."""
        from pipeline.models import load_causal_lm

        model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=device,
                               disable_dropout=model_cfg.disable_dropout)
        model.eval()
        return cls(model, prompt_format.tokenizer, prompt_format)

    def sample(self, prompts, *, max_new_tokens, temperature, top_p, top_k, seed):
        return sample_completions(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, top_k=top_k, do_sample=True,
                                  generator_seed=seed, prompt_format=self.prompt_format)

    def sample_turns(self, contexts, *, max_new_tokens, temperature, top_p, top_k, seed, stop=()):
        return sample_turns(self.model, self.tokenizer, contexts, max_new_tokens, temperature, top_p, top_k, seed, stop)

    def greedy(self, prompts, *, max_new_tokens, batch_size: int = 250):
        out = []
        for start in range(0, len(prompts), batch_size):
            out += sample_completions(self.model, self.tokenizer, list(prompts[start:start + batch_size]),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      prompt_format=self.prompt_format)["completions"]
        return out

    def load_state_dict(self, state):
        self.model.load_state_dict(state)

    def state_dict(self):
        return self.model.state_dict()

