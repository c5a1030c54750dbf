"""The agent loop: episodes of one generation call stepped together through their environments, token-in/token-out.

Each turn, the contexts of every running episode (their token ids, never re-encoded text) go to the backend as
one batched `sample_turns` call; each continuation is cut where its turn ends (EOS or the environment's stop
string), given to its environment's `step` as text, and the observation's tokens are appended for the next turn.
What is trained on is exactly what was sampled:

    completion_ids  sampled turn 1 | observation 1 | sampled turn 2 | ...        everything after the prompt
    loss_mask       1 ... 1          0 ... 0          1 ... 1                       0 on what the model did not write
    logprobs        the sampler's    0                the sampler's
    token_rewards   turn 1's reward on its last sampled token, turn 2's on its own, ...

Observations are rendered as the new turn only and appended to the ids. Without a chat template an observation is
text, tokenised alone without special tokens (the text protocol of `pipeline.envs.tools`). An episode whose first
observation is a conversation (or text, with data.chat_template) is a chat: its observations are messages (a
text one is a user message) rendered by `ChatBridge`, which also checks, strictly, that the ids decode to the
template's render of the whole conversation.

Budgets end an episode at the turn that hits them and no turn runs after it: a turn cut by `max_turn_tokens`
or the episode budget ends it with stop_reason `length` without calling its environment; `max_turns` turns
end it with `max_turns`; an environment's `done` ends it with `stop`, its own `truncated` with `truncated`.
Environment calls (construction and reset, step, close) run on a thread pool with a deadline each: an
environment that raises or outlives `timeout_s` makes its episode a placeholder (`env_error` / `timeout`,
loss mask all 0) and never stalls or fails the others. A hung call's thread cannot be killed: it is left to
finish on its own in a pool no later call waits for.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from pipeline.batch import Rollout
from pipeline.data.prompt_format import is_conversation, pad_left
from pipeline.envs.base import as_step_result
from pipeline.rollout.chat_bridge import BridgeError, ChatBridge
from pipeline.errors import UserInputError
from pipeline.torch_env import derive_seed

STOP_REASONS = ("stop", "length", "max_turns", "truncated", "timeout", "env_error")
BUDGET_STOPS = ("length", "max_turns", "truncated")     # paid per env.truncated_reward
FAILED_STOPS = ("timeout", "env_error")                  # placeholders: left out of the loss
COUNTERS = ("tool_calls", "tool_errors")                 # summed from each step's info


class EnvCallTimeout(Exception):
    """An environment call ran past its deadline."""


@dataclass
class Episode:
    row: dict
    env: Any = None
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    ids: list[int] = field(default_factory=list)           # everything after the prompt
    loss_mask: list[bool] = field(default_factory=list)    # True on sampled tokens
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)     # per token: a turn's reward on its last sampled token
    turns: int = 0
    turn_start: int = 0                                     # where the last sampled turn begins in `ids`
    last_action: str = ""
    messages: list | None = None                            # the conversation so far, for a chat episode
    bridge: Any = None                                      # its ChatBridge (with its environment's tools)
    stop_reason: Optional[str] = None                      # None while the episode runs
    error: str = ""
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def running(self) -> bool:
        return self.stop_reason is None

    def add(self, ids: Sequence[int], logprobs: Sequence[float], sampled: bool) -> None:
        self.ids += list(ids)
        self.loss_mask += [sampled] * len(ids)
        self.logprobs += list(logprobs) if sampled else [0.0] * len(ids)
        self.rewards += [0.0] * len(ids)

    def fail(self, reason: str, error: BaseException) -> None:
        """A placeholder: nothing of it is trained on, and it earns nothing."""
        self.stop_reason, self.error = reason, f"{type(error).__name__}: {error}"
        self.loss_mask = [False] * len(self.ids)
        self.rewards = [0.0] * len(self.ids)


class EnvCalls:
    """Environment calls on a thread pool, each with its own deadline from when it starts running; a call may
    return a coroutine (an `async def` method), run to completion on its thread."""

    def __init__(self, workers: int, timeout_s: float):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlpipe-env")
        self.timeout_s = timeout_s

    def run(self, calls: list[tuple[Callable, tuple]]) -> list[tuple[bool, Any]]:
        """(True, value) or (False, exception) per call, in order; EnvCallTimeout past the deadline."""
        started: list[Optional[float]] = [None] * len(calls)

        def call(i: int, fn: Callable, args: tuple):
            started[i] = time.monotonic()
            return _resolved(fn(*args))

        futures = {self.pool.submit(call, i, fn, args): i for i, (fn, args) in enumerate(calls)}
        results: list[tuple[bool, Any]] = [(False, EnvCallTimeout(""))] * len(calls)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.02, return_when=FIRST_COMPLETED)
            for f in done:
                err = f.exception()
                results[futures[f]] = (True, f.result()) if err is None else (False, err)
            now = time.monotonic()
            for f in [f for f in pending if started[futures[f]] is not None
                      and now - started[futures[f]] > self.timeout_s]:
                pending.discard(f)
                results[futures[f]] = (False, EnvCallTimeout(f"no answer within env.timeout_s={self.timeout_s}"))
        return results

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _resolved(value):
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def _start(factory: Callable, row: dict, seed: int):
    env = factory()
    return env, _resolved(env.reset(row, seed))


def run_episodes(backend, prompt_format, factory: Callable, rows: list[dict], env_cfg, rollout_cfg,
                 seed: int) -> list[Episode]:
    """One episode per row (a row repeated G times gives G episodes), all stepped together. env_cfg: the run's
    `env` section (EnvConfig); rollout_cfg: its `rollout` section (sampling settings, max_new_tokens)."""
    tokenizer = prompt_format.tokenizer
    turn_tokens = env_cfg.max_turn_tokens or rollout_cfg.max_new_tokens
    calls = EnvCalls(env_cfg.workers, env_cfg.timeout_s)
    episodes = [Episode(row=row) for row in rows]
    try:
        for e, i, (ok, value) in zip(episodes, range(len(rows)),
                                     calls.run([(_start, (factory, row, derive_seed(seed, i))) for i, row in enumerate(rows)])):
            if not ok:
                e.fail("timeout" if isinstance(value, EnvCallTimeout) else "env_error", value)
                continue
            e.env, observation = value
            if is_conversation(observation) or (prompt_format.chat_template and isinstance(observation, str)):
                e.messages = list(observation) if is_conversation(observation) else \
                    [{"role": "user", "content": observation}]
                e.bridge = ChatBridge(tokenizer, _end_of_turn(prompt_format), getattr(e.env, "schemas", None))
            try:
                tools = getattr(e.env, "schemas", None) if e.messages is not None else None
                ids, texts = prompt_format.token_ids([observation], tools)
            except UserInputError as err:          # the environment's first observation cannot be rendered
                e.fail("env_error", err)
                continue
            e.prompt_ids, e.prompt_text = ids[0], texts[0]
        for turn in range(env_cfg.max_turns):
            active = [e for e in episodes if e.running]
            if not active:
                break
            limits = [min(turn_tokens, env_cfg.max_episode_tokens - len(e.ids)) for e in active]
            stop = sorted({s for e in active for s in getattr(e.env, "stop", ()) or ()})
            c = rollout_cfg
            sampled = backend.sample_turns([e.prompt_ids + e.ids for e in active], max_new_tokens=max(limits),
                                           temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                           seed=derive_seed(seed, 1000 + turn), stop=stop)
            stepping = []
            for e, (ids, logprobs, finish), limit in zip(active, sampled, limits):
                if len(ids) > limit or (len(ids) == limit and finish == "length"):
                    ids, logprobs, finish = ids[:limit], logprobs[:limit], "length"
                e.turn_start = len(e.ids)
                e.add(ids, logprobs, sampled=True)
                e.turns += 1
                e.last_action = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if finish == "length":
                    e.stop_reason = "length"          # no environment step, no later turn
                else:
                    stepping.append(e)
            for e, (ok, value) in zip(stepping, calls.run([(e.env.step, (e.last_action,)) for e in stepping])):
                _apply_step(e, ok, value, tokenizer, env_cfg)
        for e in episodes:
            if e.running:
                e.stop_reason = "max_turns"
            if e.stop_reason in BUDGET_STOPS and env_cfg.truncated_reward == "zero":
                e.rewards = [0.0] * len(e.ids)
        calls.run([(e.env.close, ()) for e in episodes if e.env is not None and hasattr(e.env, "close")])
    finally:
        calls.shutdown()
    return episodes


def _end_of_turn(prompt_format) -> int:
    end = prompt_format.end_of_turn_id()
    if end is None:
        raise BridgeError("the chat template closes an assistant turn with no special token, so a multi-turn "
                          "episode cannot tell where a turn ends; use a template with an end-of-turn token")
    return end


def _observation_ids(e: Episode, observation, tokenizer) -> list[int]:
    """The tokens of an observation as the next turn: text alone, or in a chat the bridge's render of the new
    messages, after the end-of-turn token the template writes (inserted, unsampled, when the model's turn ended
    at a stop string instead)."""
    if e.messages is None:
        if not isinstance(observation, str):
            raise TypeError("an observation given as chat messages needs a chat episode: a first observation "
                            "that is a conversation, or data.chat_template=true")
        return tokenizer(observation, add_special_tokens=False)["input_ids"] if observation else []
    bridge, turn = e.bridge, e.ids[e.turn_start:]
    inserted = [] if turn and turn[-1] == bridge.end_of_turn_id else [bridge.end_of_turn_id]
    reply = bridge.decode(turn[:-1] if not inserted else turn)
    new = list(observation) if is_conversation(observation) else [{"role": "user", "content": str(observation)}]
    e.messages += [{"role": "assistant", "content": reply}, *new]
    return inserted + bridge.observation_ids(new)


def _apply_step(e: Episode, ok: bool, value: Any, tokenizer, env_cfg) -> None:
    """One environment step's result into its episode: the turn's reward, counters, the end or the next
    observation's tokens."""
    if ok:
        try:
            value = as_step_result(value)
        except TypeError as err:
            ok, value = False, err
    if not ok:
        e.fail("timeout" if isinstance(value, EnvCallTimeout) else "env_error", value)
        return
    e.rewards[len(e.ids) - 1] += float(value.reward)       # the last token of this turn is a sampled one
    for k in COUNTERS:
        e.counts[k] += int(value.info.get(k, 0))
    if value.done:
        e.stop_reason = "stop"
    elif value.truncated:
        e.stop_reason = "truncated"
    elif e.turns >= env_cfg.max_turns:
        e.stop_reason = "max_turns"
    else:
        try:
            obs = _observation_ids(e, value.observation, tokenizer)
        except TypeError as err:
            e.fail("env_error", err)
            return
        if len(e.ids) + len(obs) >= env_cfg.max_episode_tokens:    # no room left for another sampled token
            e.stop_reason = "length"
            return
        e.add(obs, [], sampled=False)
        if e.messages is not None:
            e.bridge.check(e.prompt_ids + e.ids, e.messages)      # strict: a mismatch stops the run (BridgeError)


def episodes_to_rollout(episodes: list[Episode], group_ids: list[int], sample_index: list[int], version: int,
                        pad_id: int, tokenizer) -> Rollout:
    """Episodes as one Rollout: the prompt left-padded, everything after it right-padded, with the loss mask,
    per-token rewards, stop reasons, turns and tool counters of each episode."""
    prompt_ids, prompt_mask = pad_left([e.prompt_ids for e in episodes], pad_id)
    T = max((len(e.ids) for e in episodes), default=0)

    def right(values: Callable[[Episode], list], fill, dtype) -> torch.Tensor:
        out = torch.full((len(episodes), T), fill, dtype=dtype)
        for i, e in enumerate(episodes):
            if e.ids:
                out[i, :len(e.ids)] = torch.tensor(values(e), dtype=dtype)
        return out

    completion_ids = right(lambda e: e.ids, pad_id, torch.long)
    return Rollout(
        prompts=[e.prompt_text for e in episodes],
        completions=[tokenizer.decode(e.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                     for e in episodes],
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=completion_ids, completion_mask=right(lambda e: [True] * len(e.ids), False, torch.bool),
        logprobs=right(lambda e: e.logprobs, 0.0, torch.float32),
        group_ids=torch.as_tensor(group_ids, dtype=torch.long),
        sample_index=torch.as_tensor(sample_index, dtype=torch.long),
        policy_version=version,
        loss_mask=right(lambda e: e.loss_mask, False, torch.bool),
        token_rewards=right(lambda e: e.rewards, 0.0, torch.float32),
        stop_reasons=[e.stop_reason for e in episodes],
        episode_counts=torch.tensor([[e.turns, *(e.counts[k] for k in COUNTERS)] for e in episodes],
                                    dtype=torch.long).reshape(len(episodes), 1 + len(COUNTERS)),
    )


def episode_eval_metrics(per_row: list[list[tuple]], success_reward: float) -> dict[str, float]:
    """Held-out figures from k episodes per row, each (score or None for a placeholder, stop_reason, turns,
    tool calls): eval/success (share of episodes scoring >= success_reward; a placeholder fails),
    eval/pass_at_<k> (share of rows with a success among their k), eval/mean_reward (over episodes that ran),
    eval/turns, eval/tool_calls, eval/stop/<reason>."""
    episodes = [e for row in per_row for e in row]
    if not episodes:
        return {"eval/success": 0.0}
    k = len(per_row[0])
    won = [[e[0] is not None and e[0] >= success_reward for e in row] for row in per_row]
    scored = [e[0] for e in episodes if e[0] is not None]
    out = {"eval/success": sum(map(sum, won)) / len(episodes),
           f"eval/pass_at_{k}": sum(any(row) for row in won) / len(per_row),
           "eval/mean_reward": sum(scored) / len(scored) if scored else 0.0,
           "eval/turns": sum(e[2] for e in episodes) / len(episodes),
           "eval/tool_calls": sum(e[3] for e in episodes) / len(episodes)}
    out.update({f"eval/stop/{r}": sum(e[1] == r for e in episodes) / len(episodes) for r in STOP_REASONS})
    return out
