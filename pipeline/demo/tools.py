"""The tools demo's task: chase a key through a table the model never sees, with a lookup tool.

Each prompt is a start key ("qzv:"). The hidden table maps it to a second key, and that key to a three-digit
number; the answer is the number. The model cannot know it without the tool: it has to call
`get('qzv')`, read the key in the result, call `get` again on that key and answer with what comes back,
three turns in the text protocol of `pipeline.envs.tools`:

    qzv:<call>get('qzv')</call><result>mbe</result><call>get('mbe')</call><result>417</result><answer>417</answer>

The table is a function of `seed` (the environment's `args`), so the demonstrations, the RL pool and the held-out
rows of one seed all share it; their start keys are disjoint, so held-out success measures tool use on keys the
model has never looked up, not a memorised table.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np
import pyarrow as pa

from pipeline.envs.tools import ToolEnvironment

LETTERS = "abcdefghijklmnopqrstuvwxyz"
START_KEYS = 4000           # start keys of a table: demonstrations, RL pool and held-out rows are drawn from them
HOPS = (2, 3)               # lookups a chain takes, half the start keys each; the demonstrations show 2 only


@functools.lru_cache(maxsize=4)
def hidden_table(seed: int, start_keys: int = START_KEYS) -> tuple[tuple[str, ...], tuple[int, ...], Mapping[str, str]]:
    """(start keys, hops, table): `start_keys` three-letter keys, each the head of its own chain of `hops` lookups
    (2 or 3, half each) through fresh three-letter keys to a number 100-999. Deterministic in `seed`; built once
    per process (each episode's environment reads it, ~25 ms to build) and read-only."""
    rng = np.random.default_rng([seed, 7919])
    hops = rng.permutation(np.resize(np.array(HOPS), start_keys)).tolist()
    codes = rng.choice(len(LETTERS) ** 3, size=start_keys + sum(h - 1 for h in hops), replace=False).tolist()
    keys = iter("".join(LETTERS[c // 26 ** p % 26] for p in (2, 1, 0)) for c in codes)
    starts, table = [], {}
    for h in hops:
        chain = [next(keys) for _ in range(h)]
        table |= dict(zip(chain, chain[1:])) | {chain[-1]: str(int(rng.integers(100, 1000)))}
        starts.append(chain[0])
    return tuple(starts), tuple(hops), MappingProxyType(table)


def chain(key: str, table: Mapping[str, str]) -> list[str]:
    """The results of looking `key` up until a number comes back: [next key, ..., number]."""
    out = [table[key]]
    while not out[-1].isdigit():
        out.append(table[out[-1]])
    return out


class KeyChain(ToolEnvironment):
    """The tools demo's environment: one tool, `get`, over the hidden table of `seed`; an episode pays 1 when its
    final `<answer>` is the number at the end of the row's chain (the row's `answer` column), else 0."""

    def __init__(self, seed: int = 0, start_keys: int = START_KEYS):
        self.table = hidden_table(seed, start_keys)[2]
        super().__init__()

    def default_tools(self):
        return [self.get]

    def get(self, key: str) -> str:
        """Look a key up in the hidden table.

        Args:
            key: three lowercase letters
        """
        return self.table[key]      # a KeyError goes back to the model as an <error> observation

    def score(self, answer: str, row: dict) -> float:
        return float(answer == str(row["answer"]))


def demonstration(key: str, table: Mapping[str, str]) -> list[dict]:
    """The episode that solves `key`, as messages after the prompt (the SFT data's response column)."""
    turns, asked = [], key
    for result in chain(key, table):
        turns += [{"role": "assistant", "content": f"<call>get('{asked}')</call>"},
                  {"role": "tool", "content": f"<result>{result}</result>"}]
        asked = result
    return turns + [{"role": "assistant", "content": f"<answer>{asked}</answer>"}]


def make_tools_task(out_dir, n_demos: int = 256, n_rl: int = 3000, n_eval: int = 500, seed: int = 0,
                    long_demos: int = 2) -> dict[str, str]:
    """Disjoint splits of the start keys of the table of `seed`, as Parquet (columns prompt, answer, hops):
      demos.parquet  `n_demos` chains, `long_demos` of them of 3 lookups and the rest of 2, each with its solving
                     episode as messages (response): the supervised start,
      train.parquet  any chain: the RL pool (the environment pays by the answer),
      eval.parquet   any chain, held out, for every success figure.
    Returns {"demos": path, "train": path, "eval": path}."""
    import pyarrow.parquet as pq

    starts, hops, table = hidden_table(seed)
    shown = [k for k, h in zip(starts, hops) if h == 2][:n_demos - long_demos] + \
        [k for k, h in zip(starts, hops) if h == 3][:long_demos]
    rest = [(k, h) for k, h in zip(starts, hops) if k not in set(shown)]
    if len(shown) < n_demos or n_rl + n_eval > len(rest):
        raise ValueError(f"{n_demos} demonstrations, {n_rl} RL and {n_eval} held-out rows requested but the table "
                         f"has {len(starts)} start keys")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"demos": [(k, 0) for k in shown], "train": rest[:n_rl], "eval": rest[n_rl:n_rl + n_eval]}
    paths = {}
    for name, rows in splits.items():
        columns = {"prompt": [f"{k}:" for k, _ in rows], "answer": [chain(k, table)[-1] for k, _ in rows],
                   "hops": [len(chain(k, table)) for k, _ in rows]}
        if name == "demos":
            columns["response"] = [demonstration(k, table) for k, _ in rows]
        paths[name] = str(out / f"{name}.parquet")
        pq.write_table(pa.table(columns), paths[name])
    return paths


# ------------------------------------------------------------------------ measuring and the supervised start

ENV_NAME = "pipeline.demo.tools:KeyChain"
EPISODE = dict(max_turns=5, max_turn_tokens=24, max_episode_tokens=160)   # 3 calls + the answer fit, with a turn spare
# Every character of an episode, a tool's error included ("<error>KeyError: 'abx'</error>"): a character outside the
# vocabulary would reach the model as <unk> (measured: after such errors it wrote garbage until its turn ran out).
CHARS = "".join(sorted(set(LETTERS + LETTERS.upper() + "0123456789" + "<>/()':_ ")))
# Measured on the 2-core build machine (tiny Llama, 256 demonstrations, bs 32, lr 3e-3 decayed to 10% at the last
# step; seed 1): held-out success is 0 for ~200 steps, then copying generalises in a jump (2-lookup chains 0% -> 96%
# by step 400). With no 3-lookup demonstration the model answers after its second call every time (0% on them, and
# no sample that RL could learn from); 2 of them give ~53% on 3-lookup chains at the plateau (75% overall), 4 ~72%,
# 8 ~75%, 24 ~78% and rising at step 600.
WARM = dict(lr=3e-3, batch_size=32, warmup_steps=50, steps=800, eval_every=100)


def env_config(seed: int):
    from pipeline.config import EnvConfig

    return EnvConfig(name=ENV_NAME, args={"seed": seed}, **EPISODE)


def measure_episodes(model, tokenizer, rows: list[dict], seed: int, k: int = 1, eval_seed: int = 0) -> dict:
    """k sampled episodes (temperature 1, the RL run's evaluation) of each held-out row with `model` in this
    process: the pipeline's eval metrics (`episode_eval_metrics`: eval/success, pass@k, turns, tool calls, stop
    shares) and eval/success_<h>_lookups per chain length."""
    from pipeline.config import RolloutConfig
    from pipeline.data.prompt_format import PromptFormat
    from pipeline.rollout.agent import FAILED_STOPS, episode_eval_metrics, run_episodes
    from pipeline.rollout.generation import HFGenerateBackend

    was_training = model.training
    model.eval()
    prompt_format = PromptFormat(tokenizer)
    episodes = run_episodes(HFGenerateBackend(model, tokenizer, prompt_format), prompt_format,
                            lambda: KeyChain(seed), [r for r in rows for _ in range(k)], env_config(seed),
                            RolloutConfig(max_new_tokens=EPISODE["max_turn_tokens"]), eval_seed)
    model.train(was_training)
    scored = [(None if e.stop_reason in FAILED_STOPS else sum(e.rewards), e.stop_reason, e.turns,
               e.counts["tool_calls"]) for e in episodes]
    metrics = episode_eval_metrics([scored[i * k:(i + 1) * k] for i in range(len(rows))], 1.0)
    for h in HOPS:
        won = [s[0] == 1.0 for s, e in zip(scored, episodes) if e.row["hops"] == h]
        metrics[f"eval/success_{h}_lookups"] = sum(won) / max(len(won), 1)
    return metrics


def episode_sft_trainer(model, tokenizer, demos: list[dict], held_out: list[dict], table_seed: int, **options):
    """A `SupervisedTrainer` on the demonstrated episodes whose evaluation is held-out episode success
    (`measure_episodes`, as eval/accuracy, which early stopping follows) beside the held-out loss of those rows'
    own solving episodes."""
    from pipeline.trainers.sft import SupervisedTrainer

    table = hidden_table(table_seed)[2]

    class EpisodeSFT(SupervisedTrainer):
        def evaluate(self) -> dict[str, float]:
            metrics = super().evaluate()
            success = measure_episodes(self.model, tokenizer, held_out, table_seed)
            metrics["eval/accuracy"] = success.pop("eval/success")
            metrics.update({k: v for k, v in success.items() if k.startswith("eval/success_")})
            return metrics

    return EpisodeSFT(model, tokenizer, [d["prompt"] for d in demos], [d["response"] for d in demos],
                      [r["prompt"] for r in held_out], [demonstration(r["prompt"][:-1], table) for r in held_out],
                      **options)


__all__ = ["KeyChain", "chain", "demonstration", "env_config", "episode_sft_trainer", "hidden_table",
           "make_tools_task", "measure_episodes"]
