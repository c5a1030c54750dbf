"""Prompts as the model sees them: chat-template rendering, tokenisation without a second BOS, lengths.

A prompt in a dataset is either text or a conversation: a list of {"role": ..., "content": ...} messages.
`PromptFormat` turns both into the token ids generation starts from:
- a conversation (and, with `chat_template=True`, a text as one user message) is rendered by the tokenizer's
  chat template with the generation prompt appended, then tokenised WITHOUT special tokens: the template
  already writes the BOS it wants (Llama 3, Gemma, Mistral), as `apply_chat_template(tokenize=True)` does;
- a text is tokenised with the tokenizer's special tokens (e.g. its BOS), except when the text already
  starts with the BOS token (a prompt rendered by a template before it reached us): a second BOS degrades
  models such as Gemma.
Prompts are left-padded (generation appends on the right).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from pipeline.errors import UserInputError


class PromptError(UserInputError):
    """A prompt that cannot be rendered or does not fit the model; the message names it and the fix."""


def is_conversation(prompt: Any) -> bool:
    """A list of messages, each a mapping with "role" and "content"."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))


class PromptFormat:
    """How one tokenizer turns dataset prompts into text and token ids (see the module docstring)."""

    def __init__(self, tokenizer, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise PromptError("data.chat_template is true but the model's tokenizer has no chat template; set "
                              "data.chat_template=false, or use a tokenizer folder with a chat_template")

    def render(self, prompts: Sequence[Any], tools: Optional[list] = None) -> tuple[list[str], list[bool]]:
        """(text, rendered by the chat template?) per prompt. tools: function schemas for the template's `tools`
        argument (an environment's tools, `ToolEnvironment.schemas`)."""
        texts, rendered = [], []
        for i, p in enumerate(prompts):
            if is_conversation(p) or (self.chat_template and isinstance(p, str)):
                messages = list(p) if is_conversation(p) else [{"role": "user", "content": p}]
                if not getattr(self.tokenizer, "chat_template", None):
                    raise PromptError(f"prompt {i} is a conversation but the model's tokenizer has no chat "
                                      "template to render it; give text prompts or a tokenizer with a chat_template")
                extra = {"tools": tools} if tools else {}
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                                **extra))
                rendered.append(True)
            elif isinstance(p, str):
                texts.append(p)
                rendered.append(False)
            else:
                raise PromptError(f"prompt {i} is neither text nor a list of {{role, content}} messages: {p!r:.80}")
        return texts, rendered

    def token_ids(self, prompts: Sequence[Any], tools: Optional[list] = None) -> tuple[list[list[int]], list[str]]:
        """Unpadded token ids per prompt, and the text each came from."""
        texts, rendered = self.render(prompts, tools)
        bos = self.tokenizer.bos_token
        specials = [not r and not (bos and t.startswith(bos)) for t, r in zip(texts, rendered)]
        ids: list[list[int]] = [[] for _ in texts]
        for flag in (True, False):                      # one batched tokenizer call per kind
            rows = [i for i, s in enumerate(specials) if s == flag]
            if rows:
                encoded = self.tokenizer([texts[i] for i in rows], add_special_tokens=flag)["input_ids"]
                for i, row in zip(rows, encoded):
                    ids[i] = list(row)
        return ids, texts

    def encode(self, prompts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """prompt_ids (n, P) long left-padded with the pad id, prompt_mask (n, P) bool, and the texts."""
        ids, texts = self.token_ids(prompts)
        return (*pad_left(ids, self.tokenizer.pad_token_id), texts)

    def end_of_turn_id(self) -> Optional[int]:
        """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
        `<end_of_turn>`), found by rendering a turn; None without a template or when it closes with none."""
        if not hasattr(self, "_end_of_turn"):
            self._end_of_turn = None
            if getattr(self.tokenizer, "chat_template", None):
                sentinel = "rlpipe-reply-7f3a"
                turn = [{"role": "user", "content": "hi"}]
                opened = self.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
                closed = self.tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": sentinel}],
                                                            tokenize=False)
                after = closed.partition(sentinel)[2] if closed.startswith(opened) else ""
                special = set(self.tokenizer.all_special_ids)
                ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
                self._end_of_turn = next((i for i in ids if i in special), None)
        return self._end_of_turn

    def lengths(self, prompts: Sequence[Any]) -> list[int]:
        """Tokens per prompt as generation sees them."""
        return [len(row) for row in self.token_ids(prompts)[0]]


def pad_left(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (n, P) long left-padded with `pad_id`, and (n, P) bool mask of the real tokens."""
    P = max((len(row) for row in ids), default=0)
    padded = torch.full((len(ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), P), dtype=torch.bool)
    for i, row in enumerate(ids):
        if len(row):
            padded[i, P - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, P - len(row):] = True
    return padded, mask


def max_positions(model_config) -> int | None:
    """The longest sequence (prompt + completion) the model's positions cover, or None if it names none."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
