"""The typed batch that flows between the pipeline's stages.

Sizes are named once for the whole code base:
    B  prompts in a step,  G  samples per prompt,  N = B * G  sequences,
    P  prompt tokens (left-padded),  T  completion tokens (right-padded).
Log-probs, values, rewards and advantages are per completion token: shape (N, T), aligned with
`completion_ids`, and only positions where `completion_mask` is True carry meaning.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Rollout:
    """What one generator returns for one shard of prompts (n sequences of the step's N)."""

    # --- text and tokens
    prompts: list[str]                 # (n,) the prompt text as the model saw it (after any chat template)
    completions: list[str]             # (n,) decoded completion text, special tokens removed
    prompt_ids: torch.Tensor           # (n, P) long, left-padded with the tokenizer's pad id
    prompt_mask: torch.Tensor          # (n, P) bool, True on real prompt tokens
    completion_ids: torch.Tensor       # (n, T) long, right-padded after the EOS token
    completion_mask: torch.Tensor      # (n, T) bool, True on generated tokens up to and incl. EOS
    # --- sampling record
    logprobs: torch.Tensor             # (n, T) float32, log pi_behaviour(token): the sampler's, at its temperature
    group_ids: torch.Tensor            # (n,) long, index of the prompt in the step (same for its G samples)
    sample_index: torch.Tensor         # (n,) long, global position 0..N-1 in the step (restores order)
    policy_version: int                # learner update count the generator's weights came from
    # --- episodes of an environment (`pipeline.rollout.agent`); None for single-turn completions
    loss_mask: Optional[torch.Tensor] = None      # (n, T) bool, True on sampled tokens (0 on observations)
    token_rewards: Optional[torch.Tensor] = None  # (n, T) float32, each turn's reward on its last sampled token
    stop_reasons: Optional[list[str]] = None      # (n,) how each episode ended (agent.STOP_REASONS)
    episode_counts: Optional[torch.Tensor] = None  # (n, 3) long: turns, tool calls, tool errors

    @property
    def train_mask(self) -> torch.Tensor:
        """(n, T) bool: the tokens losses, KL and advantages count: the sampled ones. completion_mask stays
        the attention mask (observations are attended to, not trained on)."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask


@dataclass
class TrainBatch:
    """A whole step's data after scoring: rollouts plus what the learner needs."""

    rollout: Rollout
    # --- reward
    scores: torch.Tensor                          # (N,) float32 sequence reward (failed -> 0.0)
    score_failed: torch.Tensor                    # (N,) bool, the reward function raised or returned None
    # --- filled by the reference / values stage and the advantage stage
    pi_old: str = "sampler"                       # where pi_old comes from, decided once by the driver
                                                  # (`pipeline.config.pi_old_source`): "sampler" (the rollout's
                                                  # log-probs), "learner" (a learner pass: old_logprobs), or
                                                  # "update" (the update's own forward, detached)
    old_logprobs: Optional[torch.Tensor] = None   # (N, T) float32 log pi_old(token) of the learner's pass
    ref_logprobs: Optional[torch.Tensor] = None   # (N, T) float32 log pi_ref(token)
    values: Optional[torch.Tensor] = None         # (N, T) float32 critic value before each token
    advantages: Optional[torch.Tensor] = None     # (N, T) float32
    returns: Optional[torch.Tensor] = None        # (N, T) float32 value targets (critic estimators only)

    @property
    def num_sequences(self) -> int:
        return len(self.rollout.prompts)

    @property
    def pi_old_logprobs(self) -> Optional[torch.Tensor]:
        """(N, T) log pi_old as known before the update: the learner pass's or the sampler's; None when pi_old
        is the update's own forward (only the update computes it)."""
        if self.pi_old == "learner" and self.old_logprobs is None:
            raise RuntimeError("TrainBatch.pi_old is 'learner' but old_logprobs holds no learner pass")
        return {"learner": self.old_logprobs, "sampler": self.rollout.logprobs}.get(self.pi_old)

    def keep_rows(self, keep: torch.Tensor) -> "TrainBatch":
        """The batch restricted to rows where `keep` (N,) bool is True, before the later stages ran (dropping
        samples whose reward failed: they leave the loss and their group's statistics)."""
        if any(getattr(self, f) is not None for f in ("old_logprobs", "ref_logprobs", "values", "advantages")):
            raise RuntimeError("keep_rows runs right after scoring, before the reference/values stage")
        rows = keep.nonzero().squeeze(-1)
        return TrainBatch(rollout=select_rollout(self.rollout, rows), scores=self.scores[rows],
                          score_failed=self.score_failed[rows])


PER_TOKEN = {"completion_ids": 0, "completion_mask": False, "logprobs": 0.0, "loss_mask": False,
             "token_rewards": 0.0}     # right-padded (n, T) fields and their padding


def concat_rollouts(parts: list[Rollout], mixed_versions: bool = False) -> Rollout:
    """Join generator shards into one step rollout, ordered by `sample_index`, padding P and T.

    Prompts are left-padded, so a narrower shard gets padding added on the left; completions are
    right-padded, so padding goes on the right. Pad ids are 0 here: masked positions are never read.
    mixed_versions: shards may come from different policy versions (asynchronous rollouts, where a
    restarted generator regenerates its shard with newer weights); the rollout then carries the oldest.
    A shard holds whole groups, so a group never mixes versions; each sample's log-probs are its own
    sampler's.
    """
    if not parts:
        raise ValueError("no rollout shards to join")
    versions = {p.policy_version for p in parts}
    if len(versions) != 1 and not mixed_versions:
        raise RuntimeError(f"rollout shards come from different policy versions {sorted(versions)}")
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, width: int, left: bool, value=0) -> torch.Tensor:
        extra = width - x.shape[1]
        if extra == 0:
            return x
        pad_block = torch.full((x.shape[0], extra), value, dtype=x.dtype)
        return torch.cat([pad_block, x] if left else [x, pad_block], dim=1)

    def join(name: str):
        values = [getattr(p, name) for p in parts]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise RuntimeError(f"rollout shards disagree on whether they carry {name}")
        if isinstance(values[0], list):
            return [x for v in values for x in v]
        if values[0].dim() == 2 and name in PER_TOKEN:
            return torch.cat([pad(v, T, left=False, value=PER_TOKEN[name]) for v in values])
        return torch.cat(values)

    joined = Rollout(
        prompts=join("prompts"), completions=join("completions"),
        prompt_ids=torch.cat([pad(p.prompt_ids, P, left=True) for p in parts]),
        prompt_mask=torch.cat([pad(p.prompt_mask, P, left=True, value=False) for p in parts]),
        **{f.name: join(f.name) for f in fields(Rollout)
           if f.name not in ("prompts", "completions", "prompt_ids", "prompt_mask", "policy_version")},
        policy_version=min(versions),
    )
    order = torch.argsort(joined.sample_index)
    return select_rollout(joined, order)


def select_rollout(r: Rollout, index: torch.Tensor) -> Rollout:
    """The rows `index` (1-D long) of a rollout, in that order."""
    idx = index.tolist()
    kwargs = {}
    for f in fields(Rollout):
        value = getattr(r, f.name)
        if isinstance(value, torch.Tensor):
            kwargs[f.name] = value[index]
        elif isinstance(value, list):
            kwargs[f.name] = [value[i] for i in idx]
        else:
            kwargs[f.name] = value
    return Rollout(**kwargs)


def split_indices(n: int, parts: int) -> list[range]:
    """Split 0..n-1 into `parts` contiguous near-equal ranges (some may be empty when parts > n)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


__all__ = ["Rollout", "TrainBatch", "concat_rollouts", "select_rollout", "split_indices", "replace"]
