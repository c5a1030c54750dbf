"""The chat-template bridge: an environment's observation, given as chat messages, rendered as the new turn only, so
an episode's ids stay the sampled ones (token-in/token-out) under a chat template.

Rendering the whole conversation again each turn and re-encoding it would change what was sampled (a merge across
the turn boundary, whitespace a template strips): the trained ids would not be the sampled ones. Instead the
bridge renders the new messages after a fixed base conversation and keeps the difference, plus what the template
writes between an assistant's end-of-turn token and the next message (ChatML's "\\n" after <|im_end|>, the token
verl#6501 lost at every boundary). A turn the model ended without the end-of-turn token (a stop string) gets it
inserted, unsampled (loss mask 0), as the template would write it.

Strict: after every observation the episode's ids, decoded, must equal the full conversation rendered by the
template. A template that is not prefix-preserving (one that rewrites earlier turns, as Qwen3's drops earlier
<think> blocks) fails this check, and the run stops with `BridgeError` naming where the two differ: training on a
sequence the template would never produce is the silent wrong this prevents.
"""
from __future__ import annotations

from pipeline.errors import UserInputError

_BASE = [{"role": "user", "content": "rlpipe-bridge-question"},
         {"role": "assistant", "content": "rlpipe-bridge-reply"}]


class BridgeError(UserInputError):
    """The chat template does not render a conversation as the sum of its turns."""


class ChatBridge:
    def __init__(self, tokenizer, end_of_turn_id: int, tools: list | None = None):
        self.tokenizer = tokenizer
        self.tools = tools or None          # the environment's tool schemas, rendered where the template puts them
        self.end_of_turn_id = end_of_turn_id
        self.end_of_turn = tokenizer.convert_ids_to_tokens(end_of_turn_id)
        self.base = self.render(_BASE, generation_prompt=False)
        if self.end_of_turn not in self.base:
            raise BridgeError(f"the chat template closes an assistant turn without {self.end_of_turn!r}; the bridge "
                              "cannot find where a turn ends")
        self.boundary = self.base.rsplit(self.end_of_turn, 1)[1]       # written after the end-of-turn token

    def render(self, messages: list, generation_prompt: bool = True) -> str:
        extra = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **extra)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def observation_ids(self, messages: list) -> list[int]:
        """The ids of `messages` as the turn after an assistant's end-of-turn token, with the generation prompt
        of the next assistant turn."""
        full = self.render(_BASE + list(messages))
        if not full.startswith(self.base):
            raise BridgeError("the chat template renders earlier turns differently once a message follows them "
                              "(not prefix-preserving); multi-turn episodes need one that is")
        return self.encode(self.boundary + full[len(self.base):])

    def check(self, ids: list[int], messages: list) -> None:
        """Raise BridgeError unless `ids` (prompt and everything after it) decode to `messages` rendered whole."""
        have, want = self.decode(ids), self.render(messages)
        if have != want:
            at = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
            raise BridgeError(f"the episode's tokens and the chat template's full render of its conversation differ at "
                              f"character {at}: tokens give {have[max(0, at - 20):at + 20]!r}, the template "
                              f"{want[max(0, at - 20):at + 20]!r}; the template is not the sum of its turns, so "
                              "the sampled ids cannot be trained as one conversation")
