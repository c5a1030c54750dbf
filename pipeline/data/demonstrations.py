"""Demonstrations for supervised fine-tuning: a user's table read into (prompt, response) pairs, checked before
anything is written.

Two layouts, as the field ships them (TRL's SFTTrainer, OpenRLHF's SFT dataset):
- **prompt / response columns**: a prompt (text, or a conversation: a list of {"role", "content"} messages)
  and the text the model should answer with. Without a `response` column, the `answer` column is the response
  (a prompt/answer table made for RL trains as it is).
- **a messages column**: one conversation per row whose LAST message is the assistant's reply. The messages
  before it are the prompt, rendered by the tokenizer's chat template with the generation prompt; the reply
  is the response. Loss is on the response tokens only, either way.
An `answer` column, when present, is what held-out greedy exact match compares with.

**Demonstrated episodes** (multi-turn tool use, for an environment run's supervised start): a messages row
holding a `tool` message is an episode. The messages before the first assistant message are the prompt, and
every later assistant message is trained; tool (or any other) messages are observations, with loss 0. In
the prompt / response layout, a response may also be such a list of messages after a text prompt: the text
protocol of `pipeline.envs.tools`, for models without a chat template. Either way the tokens are laid out as
the agent loop lays out an episode (`pipeline.trainers.sft.episode_ids`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.data.prompt_table import DataError, hold_out, read_prompt_table


@dataclass
class Demonstrations:
    """Rows of one file: `prompts` (text or message lists), `responses` (text, or for a demonstrated episode its
    messages after the prompt), `answers` (text or None)."""
    path: str
    prompts: list
    responses: list
    answers: Optional[list[str]]

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, n_eval: int, seed: int) -> tuple["Demonstrations", "Demonstrations"]:
        """(train, held-out): `n_eval` rows drawn at random (seeded) for evaluation, the rest for training."""
        return hold_out(self, n_eval, seed, "rows")


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _messages_error(path, column: str, row: int, why: str) -> DataError:
    return DataError(f"{path}: row {row} of column {column!r} {why}; each row must be a list of "
                     '{"role": str, "content": str} messages ending with the assistant\'s reply, e.g. '
                     '[{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]')


def _episode_turns(path, column: str, row: int, turns: list) -> list[dict]:
    """A response given as an episode's messages, checked: role/content dicts, ending with the assistant's."""
    if not turns or not all(_is_message(m) for m in turns) or turns[-1]["role"] != "assistant":
        raise DataError(f"{path}: row {row} of column {column!r} is a list but not an episode: give role/content "
                        'messages ending with the assistant\'s, e.g. [{"role": "assistant", "content": '
                        '"<call>lookup(\'a\')</call>"}, {"role": "tool", "content": "<result>4</result>"}, '
                        '{"role": "assistant", "content": "<answer>4</answer>"}]')
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def read_demonstrations(path, *, prompt_column: str = "prompt", response_column: Optional[str] = None,
                        messages_column: Optional[str] = None, answer_column: str = "answer") -> Demonstrations:
    """Read and check a Parquet / JSON-lines file of demonstrations (see the module docstring).

    response_column None: "response" if the file has it, else `answer_column`. Raises one DataError naming
    the file, the column, the row and the fix for: a missing column, a messages row that is not a list of
    role/content dicts or does not end with an assistant message, a prompt that is neither text nor messages,
    a response that is not text or is empty.
    """
    if messages_column is not None:
        table = read_prompt_table(path, required_columns=(messages_column,))
        prompts, responses = [], []
        for i, conversation in enumerate(table.column(messages_column).to_pylist()):
            if not isinstance(conversation, list) or not conversation:
                raise _messages_error(path, messages_column, i, f"is {type(conversation).__name__}, not a "
                                      "non-empty list")
            bad = next((m for m in conversation if not _is_message(m)), None)
            if bad is not None:
                raise _messages_error(path, messages_column, i, f"holds {bad!r:.60}, not a role/content dict")
            if conversation[-1]["role"] != "assistant" or len(conversation) < 2:
                raise _messages_error(path, messages_column, i, "does not end with an assistant message after "
                                      "at least one other message")
            conversation = [{"role": m["role"], "content": m["content"]} for m in conversation]
            first = next(k for k, m in enumerate(conversation) if m["role"] == "assistant")
            if first > 0 and any(m["role"] == "tool" for m in conversation[first:]):     # an episode
                prompts.append(conversation[:first])
                responses.append(conversation[first:])
                continue
            prompts.append(conversation[:-1])
            responses.append(conversation[-1]["content"])
    else:
        table = read_prompt_table(path, required_columns=(prompt_column,))
        if response_column is None:
            response_column = "response" if "response" in table.column_names else answer_column
        if response_column not in table.column_names:
            raise DataError(f"{path} lacks the response column {response_column!r}; columns present: "
                            f"{', '.join(table.column_names)}. Name it with --response-column, or give a "
                            "conversation column with --messages-column")
        prompts = table.column(prompt_column).to_pylist()
        for i, p in enumerate(prompts):
            if not isinstance(p, str) and not (isinstance(p, list) and p and all(_is_message(m) for m in p)):
                raise DataError(f"{path}: row {i} of column {prompt_column!r} is {p!r:.60}, neither text nor a "
                                "list of {role, content} messages; convert the column to strings (e.g. "
                                "df[col].astype(str)) or give messages")
        responses = table.column(response_column).to_pylist()
        for i, r in enumerate(responses):
            if isinstance(r, (int, float)) and not isinstance(r, bool):
                responses[i] = str(r)         # a numeric answer column ("579" stored as 579) is its text
            elif isinstance(r, list):
                responses[i] = _episode_turns(path, response_column, i, r)
            elif not isinstance(r, str):
                raise DataError(f"{path}: row {i} of column {response_column!r} is {r!r:.60}, not text; the "
                                "response column must hold the text the model should answer with")
    for i, r in enumerate(responses):
        if isinstance(r, str) and not r.strip():
            raise DataError(f"{path}: row {i} has an empty response; drop the row or fill it in")
    answers = None
    if answer_column in table.column_names:
        answers = [str(a) for a in table.column(answer_column).to_pylist()]
    return Demonstrations(str(path), prompts, responses, answers)


__all__ = ["Demonstrations", "read_demonstrations"]
