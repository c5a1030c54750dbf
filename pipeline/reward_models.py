"""Learned reward models: one scalar per (prompt, response), from a Hugging Face
`AutoModelForSequenceClassification` folder with one label. `rlpipe reward-model` trains them; reward scorers
serve them. Both go through `encode_for_reward`, so a model scores exactly the layout it was trained on.

Two input layouts, chosen from the backbone and saved in the folder's config (`rlpipe_reward_input`):
- `decoder` (a causal LM's trunk, as DeepSpeed-Chat and OpenRLHF build reward models from the SFT model): the
  prompt as generation sees it (`PromptFormat`), then the response and EOS, right-padded; HF's sequence
  classifier reads the score at the last non-pad token;
- `pair` (an encoder such as BERT / MiniLM): the tokenizer's pair encoding, [CLS] prompt [SEP] response [SEP];
  the score comes from the pooled [CLS].
A conversation prompt is rendered by the chat template where the tokenizer has one, else as "role: content"
lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.models import (DTYPES, ModelLoadError, _load_error, _no_dropout_modules, check_model_path,
                             load_model_config, load_report_silenced, zero_dropout)
from pipeline.prompts import PromptFormat, is_conversation

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
                      max_length: Optional[int] = None) -> list[list[int]]:
    """Token ids per (prompt, response) in `layout` (unpadded); longer than `max_length`: the last
    `max_length` tokens for `decoder` (the response is what is judged), the pair tokenizer's truncation of
    the prompt first for `pair`."""
    if layout == "pair":
        texts = [_prompt_text(tokenizer, p) for p in prompts]
        kwargs = dict(truncation="only_first", max_length=max_length) if max_length else {}
        encoded = tokenizer(texts, [str(r) for r in responses], **kwargs)
        return [list(ids) for ids in encoded["input_ids"]]
    prompt_ids, _ = PromptFormat(tokenizer).token_ids(
        [p if is_conversation(p) else str(p) for p in prompts])
    response_ids = tokenizer([str(r) for r in responses], add_special_tokens=False)["input_ids"]
    rows = [list(p) + list(r) + [tokenizer.eos_token_id] for p, r in zip(prompt_ids, response_ids)]
    return [row[-max_length:] if max_length else row for row in rows]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Rows of ids -> {"input_ids" (n, L) right-padded, "attention_mask" (n, L)}."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def reward_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n,) float32 scores of a padded batch (see `pad_right`)."""
    return model(**batch).logits[:, 0].float()


def build_reward_model(backbone: str, tokenizer, dtype: str = "float32", disable_dropout: bool = True):
    """A one-label sequence classifier on `backbone` (a causal LM or an encoder folder; the score head is new
    unless the folder already is a reward model); its layout saved in the config."""
    return _load_sequence_classifier(backbone, tokenizer, dtype, disable_dropout)


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
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        with load_report_silenced():   # "score.weight newly initialised" is what a new reward model is
            model = AutoModelForSequenceClassification.from_pretrained(check_model_path(path), config=config,
                                                                       dtype=DTYPES[dtype])
    except Exception as err:
        raise _load_error("reward model", path, err) from None
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
        from pipeline.prompts import max_positions

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


__all__ = ["RewardModelFunction", "check_reward_model", "INPUT_FIELD", "LAYOUTS", "backbone_layout", "encode_for_reward", "pad_right", "reward_scores",
           "build_reward_model", "load_reward_model"]
