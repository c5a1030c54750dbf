"""Models: the demo's character tokenizer and tiny Llama, loading any HF causal LM, the critic, and
the two forward paths every stage shares (scoring completions, sampling them).

Shapes follow `pipeline.batch`: n sequences, P prompt tokens (left-padded), T completion tokens
(right-padded), V vocabulary entries, H hidden size.

`completion_forward` is the single definition of "the log-prob of a completion": the learner, the
reference model and the tests all go through it, and `sample_completions` records generation-time
log-probs from the same raw logits, so the importance ratio pi/pi_old starts at exactly 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.errors import UserInputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserInputError):
    """A model or tokenizer path that cannot be loaded; the message names the path and the fix."""


# ----------------------------------------------------------------------------- demo tokenizer / model

def build_char_tokenizer(chars: str = "0123456789+-*= "):
    """A one-token-per-character tokenizer (`PreTrainedTokenizerFast`).

    Vocabulary: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then `chars` in order. Encoding with special tokens
    prepends <bos>; decoding joins tokens with "" so "123+456=" round-trips exactly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError(f"tokenizer characters must be unique, got {chars!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char is a word
    tok.decoder = decoders.Fuse()  # WordLevel's default would join words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     intermediate_size: int = 344, max_positions: int = 64, seed: int = 0,
                     chars: str = "0123456789+-*= ") -> str:
    """Save a randomly initialised Llama plus the character tokenizer as an HF folder; return its path.

    Llama (not Qwen2) on purpose: a Qwen2 config makes `AutoTokenizer` load a Qwen2 tokenizer class
    that drops spaces (FACTS.md). Defaults give ~0.8 M parameters.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer(chars)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- loading

def _check_model_path(path) -> str:
    path = str(path)
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise ModelLoadError(
            f"{path} does not exist. Pass a folder made by save_pretrained, or build the demo model "
            "with `rlpipe warmstart`."
        )
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder (no config.json). Pass a folder made by "
            "save_pretrained, or build the demo model with `rlpipe warmstart`."
        )
    return str(local) if local.is_dir() else path


def _load_error(what: str, path: str, err: Exception) -> ModelLoadError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    offline = " (offline mode: only local folders or cached hub names work)" \
        if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ModelLoadError(
        f"could not load the {what} from {path!r}{offline}: {first_line}. Pass a local folder made by "
        "save_pretrained (with config.json and tokenizer files), a cached hub name, or build the demo "
        "model with `rlpipe warmstart`."
    )


def load_tokenizer(path):
    """`AutoTokenizer` for `path`, left-padded (prompts are left-padded for generation), with a pad token."""
    from transformers import AutoTokenizer

    path = _check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # HF raises OSError, ValueError, HFValidationError, ... for bad paths
        raise _load_error("tokenizer", path, err) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # harmless: pad positions are always masked out
    return tokenizer


def resolve_device(device: str = "cpu") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(path, dtype: str = "float32", device: str = "cpu"):
    """`AutoModelForCausalLM` for `path` in `dtype` ("float32" | "bfloat16" | "float16") on `device`
    ("cpu", "cuda", "cuda:1", or "auto" = cuda when available)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    path = _check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except Exception as err:
        raise _load_error("causal LM", path, err) from None
    return model.to(resolve_device(device))


class CriticModel(nn.Module):
    """A separate value model: the base transformer (no LM head) plus a zero-initialised linear value
    head, so V(s) starts at 0 for every state and early advantages equal the returns."""

    def __init__(self, path, dtype: str = "float32"):
        super().__init__()
        from transformers import AutoModel

        path = _check_model_path(path)
        try:
            self.backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
        except Exception as err:
            raise _load_error("critic backbone", path, err) from None
        self.value_head = nn.Linear(self.backbone.config.hidden_size, 1, dtype=DTYPES[dtype])
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, attention_mask: (n, L) -> values (n, L) float32, one per position."""
        if position_ids is None:
            position_ids = left_padded_positions(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # (n, L, H)
        return self.value_head(hidden).squeeze(-1).float()


# ----------------------------------------------------------------------------- forward paths

def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, L) mask -> (n, L) long position ids that start at 0 on each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                       temperature: float = 1.0, want_entropy: bool = False,
                       want_hidden: bool = False) -> dict:
    """Score completions under `model` with one forward pass over cat(prompt, completion).

    prompt_ids, prompt_mask: (n, P), left-padded; completion_ids, completion_mask: (n, T), right-padded.
    Returns {"logprobs": (n, T) float32 log softmax(logits / temperature) at the completion ids,
             "entropy": (n, T) float32 (if want_entropy), "hidden": (n, T, H) last hidden state at the
             position that predicts each completion token (if want_hidden; input for a value head)}.
    Values at masked positions are meaningless but finite.
    """
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                   # (n, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()     # (n, P+T)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=left_padded_positions(attention_mask),
                  output_hidden_states=want_hidden, use_cache=False)
    # Logits at positions P-1 .. P+T-2 predict completion tokens 0 .. T-1. Asking the model for only the
    # last T+1 positions spares the (n, P, V) prompt logits; the very last position is dropped below.
    kwargs["logits_to_keep"] = T + 1
    out = model(**kwargs)
    logits = out.logits[:, -(T + 1):-1].float() / temperature                    # (n, T, V)
    # log_softmax gathered at one id = logit - logsumexp: never materialises a second (n, T, V) tensor.
    log_norm = torch.logsumexp(logits, dim=-1)                                   # (n, T)
    picked = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)         # (n, T)
    result = {"logprobs": picked - log_norm}
    if want_entropy:
        probs = torch.softmax(logits, dim=-1)
        result["entropy"] = log_norm - (probs * logits).sum(-1)                  # H = logZ - E[logit]
    if want_hidden:
        result["hidden"] = out.hidden_states[-1][:, P - 1:P + T - 1]             # (n, T, H)
    return result


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts exactly as generation sees them: special tokens added (e.g. <bos>), left-padded.
    Returns prompt_ids (n, P) long and prompt_mask (n, P) bool."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"].bool()


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       do_sample: bool = True, generator_seed: Optional[int] = None) -> dict:
    """Generate one completion per prompt with HF `generate` (the HF rollout backend).

    Returns prompt_ids, prompt_mask (n, P); completion_ids, completion_mask (n, T) where T is the longest
    completion, the mask covers generated tokens up to and including EOS, and later tokens are pad;
    logprobs (n, T) float32 = log softmax(raw logits / temperature) of the sampled tokens (the same
    quantity `completion_forward` computes; with top_p < 1 or top_k > 0 the sampler truncated that
    distribution, so these are the untruncated policy's log-probs); completions: decoded text.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    eos_ids = _eos_ids(model, tokenizer)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    was_training = model.training
    model.eval()
    # A model folder's generation_config may carry extra processors (repetition penalty, ...) that
    # would make sampled tokens follow a different distribution from the one we record; neutralise them.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), max_new_tokens=max_new_tokens,
            do_sample=do_sample, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids, repetition_penalty=1.0, no_repeat_ngram_size=0,
            return_dict_in_generate=True, output_logits=True, **sampling,
        )
    model.train(was_training)
    completion_ids = out.sequences[:, prompt_ids.shape[1]:]                      # (n, T)
    logits = torch.stack(out.logits, dim=1).float() / temperature                # (n, T, V)
    logprobs = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    # Mask: tokens up to and including the first EOS. `before_eos` counts EOS tokens strictly before t.
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device))
    before_eos = is_eos.long().cumsum(-1) - is_eos.long()
    completion_mask = before_eos == 0
    T = int(completion_mask.sum(-1).max().item()) if completion_mask.numel() else 0
    completion_mask = completion_mask[:, :T]
    completion_ids = completion_ids[:, :T].masked_fill(~completion_mask, tokenizer.pad_token_id)
    logprobs = logprobs[:, :T].masked_fill(~completion_mask, 0.0)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "logprobs": logprobs,
        "completions": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
    }


__all__ = [
    "ModelLoadError", "CriticModel", "build_char_tokenizer", "build_tiny_model", "load_tokenizer",
    "load_causal_lm", "resolve_device", "left_padded_positions", "completion_forward",
    "encode_prompts", "sample_completions",
]
