"""Learned reward models: one scalar per (prompt, response), from a Hugging Face
`AutoModelForSequenceClassification` folder with one label. `rlpipe reward-model` trains them; reward scorers
serve them. Both go through `encode_for_reward`, so a model scores exactly the layout it was trained on.

Two input layouts, chosen from the backbone and saved in the folder's config (`rlpipe_reward_input`):
- `decoder` (a causal LM's trunk, as DeepSpeed-Chat and OpenRLHF build reward models from the SFT model): the
  prompt as generation sees it (`PromptFormat`), then the response and EOS; the score is read at the last
  real token by the attention mask (the EOS), with position ids from the mask, so a row scores the same
  alone or in any padded batch, padded left or right. HF's own classifier pooling is not used: it reads the
  last position whose id is not `config.pad_token_id`, which ignores the mask, lands on padding when the
  config's pad id is not the tokenizer's, and skips the EOS when pad == eos (GPT-2, Llama-3, Qwen);
- `pair` (an encoder such as BERT / MiniLM): the tokenizer's pair encoding, [CLS] prompt [SEP] response [SEP]
  with its token type ids (segment B on the response), right-padded; the score comes from the pooled [CLS].
A conversation prompt is rendered by the chat template where the tokenizer has one, else as "role: content"
lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.models import (DTYPES, ModelLoadError, _load_error, _no_dropout_modules, check_model_path,
                             load_model_config, load_report_silenced, zero_dropout)
from pipeline.data.prompt_format import PromptFormat, is_conversation

INPUT_FIELD = "rlpipe_reward_input"
LOADS = {"count": 0}          # reward models loaded by this process (a scorer loads each once)
LAYOUTS = ("decoder", "pair")


def backbone_layout(config) -> str:
    """The layout saved in a reward model's config; else `decoder` for a decoder-only family (it has a causal
    LM class and no masked LM class: Llama, GPT-2, Qwen, ...) and `pair` for encoders (BERT, DeBERTa, ...)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    saved = getattr(config, INPUT_FIELD, None)
    if saved in LAYOUTS:
        return saved
    decoder = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "decoder" if decoder else "pair"


def _prompt_text(tokenizer, prompt) -> str:
    if is_conversation(prompt):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return str(prompt)


def encode_for_reward(tokenizer, prompts: Sequence, responses: Sequence[str], layout: str,
                      max_length: Optional[int] = None) -> list[dict[str, list[int]]]:
    """One row per (prompt, response) in `layout`, unpadded: {"input_ids"} and, for `pair` where the
    tokenizer makes them, {"token_type_ids"}. Longer than `max_length`: the last `max_length` tokens for
    `decoder` (the response is what is judged), the pair tokenizer's truncation of the prompt first for `pair`."""
    if layout == "pair":
        texts = [_prompt_text(tokenizer, p) for p in prompts]
        kwargs = dict(truncation="only_first", max_length=max_length) if max_length else {}
        encoded = tokenizer(texts, [str(r) for r in responses], **kwargs)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        return [{k: list(encoded[k][i]) for k in keys} for i in range(len(texts))]
    prompt_ids, _ = PromptFormat(tokenizer).token_ids(
        [p if is_conversation(p) else str(p) for p in prompts])
    response_ids = tokenizer([str(r) for r in responses], add_special_tokens=False)["input_ids"]
    rows = [list(p) + list(r) + [tokenizer.eos_token_id] for p, r in zip(prompt_ids, response_ids)]
    return [{"input_ids": row[-max_length:] if max_length else row} for row in rows]


def pad_right(rows: Sequence[dict[str, Sequence[int]]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Rows from `encode_for_reward` -> {"input_ids" (n, L) right-padded with pad_id, "attention_mask" (n, L),
    and "token_type_ids" (n, L) padded with 0 when the rows carry them}."""
    L = max(len(r["input_ids"]) for r in rows)
    keys = [k for k in rows[0] if k != "input_ids"]
    out = {"input_ids": torch.full((len(rows), L), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), L), dtype=torch.long),
           **{k: torch.zeros((len(rows), L), dtype=torch.long) for k in keys}}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(list(r["input_ids"]), dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        for k in keys:
            out[k][i, :n] = torch.tensor(list(r[k]), dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, L) mask -> (n,) long index of each row's last real token, for left and right padding alike."""
    L = attention_mask.shape[1]
    return L - 1 - attention_mask.long().flip(-1).argmax(-1)


def reward_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) float32 scores of a padded batch (`pad_right`, or left-padded), independent of the batch's other rows.

    `pair`: the classifier's pooled [CLS] (right padding keeps it first). `decoder`: the head's per-position
    scores are taken from inside the one forward (a hook on `score`, so a wrapped or sharded model runs its
    own forward as usual) and read at the last real token by the mask."""
    if getattr(model, "reward_layout", "decoder") == "pair":
        return model(**batch).logits[:, 0].float()
    from pipeline.models import left_padded_positions

    captured = {}
    handle = model.score.register_forward_hook(lambda module, args, out: captured.__setitem__("scores", out))
    try:
        model(**batch, position_ids=left_padded_positions(batch["attention_mask"]))
    finally:
        handle.remove()
    scores = captured["scores"][..., 0]                                      # (n, L): a score per position
    last = last_real_token(batch["attention_mask"]).to(scores.device)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1).float()


def build_reward_model(backbone: str, tokenizer, dtype: str = "float32", disable_dropout: bool = True):
    """A one-label sequence classifier on `backbone` (a causal LM or an encoder folder; the score head is new
    unless the folder already is a reward model); its layout saved in the config."""
    return _load_sequence_classifier(backbone, tokenizer, dtype, disable_dropout)


def score_heads(model) -> tuple[str, ...]:
    """The top-level modules of a sequence classifier that are its new score head (`score` on causal-LM
    backbones, `classifier` on encoders): what trains in full when the backbone trains LoRA adapters."""
    return tuple(name for name in ("score", "classifier") if isinstance(getattr(model, name, None), torch.nn.Module))


def load_reward_model(path: str, dtype: str = "float32"):
    """A trained reward model (a one-label sequence classifier folder) and its tokenizer, for scoring.
    Anything else is one ModelLoadError naming the path and the fix."""
    from pipeline.models import load_tokenizer

    check_reward_model(path)
    tokenizer = load_tokenizer(path)
    model = _load_sequence_classifier(path, tokenizer, dtype, True)
    model.eval()
    LOADS["count"] += 1
    return model, tokenizer


def check_reward_model(path: str, what: str = "reward model") -> None:
    """One ModelLoadError unless `path` is a one-label sequence classifier folder (reads its config only)."""
    config = load_model_config(path, what)
    names = getattr(config, "architectures", None) or []
    if not (any(n.endswith("ForSequenceClassification") for n in names) and config.num_labels == 1):
        raise ModelLoadError(f"{what} {path!r} is a {', '.join(names) or config.model_type} with "
                             f"{config.num_labels} labels, not a sequence classifier with one label; train one "
                             "with `rlpipe reward-model --model BACKBONE --data pairs.parquet`")


def _load_sequence_classifier(path, tokenizer, dtype, disable_dropout):
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(path, "reward model")
    layout = backbone_layout(config)
    zeroed = zero_dropout(config) if disable_dropout else {}
    config.num_labels = 1
    setattr(config, INPUT_FIELD, layout)
    config.pad_token_id = tokenizer.pad_token_id     # HF's pooling (unused by `reward_scores`) agrees with ours
    try:
        with load_report_silenced():   # "score.weight newly initialised" is what a new reward model is
            model = AutoModelForSequenceClassification.from_pretrained(check_model_path(path), config=config,
                                                                       dtype=DTYPES[dtype])
    except Exception as err:
        raise _load_error("reward model", path, err) from None
    if layout == "decoder" and not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ModelLoadError(f"reward model {path!r}: {type(model).__name__} has no per-position `score` head to read "
                             "at the last real token; use a decoder family with one (Llama, Qwen2, Mistral, GPT-2, "
                             "...) or an encoder (pair layout)")
    if disable_dropout:
        _no_dropout_modules(model)
    model.zeroed_dropout = zeroed
    model.reward_layout = layout
    return model


class RewardModelFunction:
    """A learned reward model as a reward function, `(prompts, completions, **columns) -> list[float]`, scored
    in batches of `batch_size` without gradients; loaded once, when built (a scorer builds it at start)."""

    def __init__(self, path: str, batch_size: int = 64, device: str = "cpu", dtype: str = "float32",
                 max_length: Optional[int] = None):
        from pipeline.data.prompt_format import max_positions

        self.model, self.tokenizer = load_reward_model(path, dtype)
        self.model.to(device)
        self.device, self.batch_size = device, batch_size
        self.max_length = max_length or max_positions(self.model.config)
        self.__name__ = f"rm:{Path(path).name}"

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence[str], **_) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = encode_for_reward(self.tokenizer, prompts[start:start + self.batch_size],
                                     completions[start:start + self.batch_size], self.model.reward_layout,
                                     self.max_length)
            scores += reward_scores(self.model, pad_right(rows, self.tokenizer.pad_token_id, self.device)).tolist()
        return scores


__all__ = ["RewardModelFunction", "check_reward_model", "INPUT_FIELD", "LAYOUTS", "backbone_layout",
           "encode_for_reward", "pad_right", "last_real_token", "reward_scores", "build_reward_model",
           "load_reward_model", "score_heads"]
