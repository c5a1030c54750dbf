"""Advantage estimators, all chosen by name through `ADVANTAGE_ESTIMATORS`.

Sizes follow `pipeline.batch`: N sequences (B prompts x G samples), T completion tokens, right-padded.
Every estimator is `fn(inp: AdvantageInputs) -> (advantages (N, T), returns (N, T) | None)`; advantages
are 0 at masked positions, returns are only given by critic-based estimators.

- "gae"          Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438), then whitened
                 over the batch's valid tokens as OpenRLHF / DeepSpeed-Chat PPO do. Needs a critic.
- "grpo"         Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300):
                 outcome score normalised within its prompt's group, (s - mean) / (std + eps).
- "dr_grpo"      Dr.GRPO (Liu et al. 2025, arXiv:2503.20783): GRPO without the division by the group std.
- "rloo"         REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740): the baseline of a
                 sample is the mean score of the other G-1 samples of its prompt.
- "reinforce_pp" REINFORCE++ (Hu 2025, arXiv:2501.03262): per-token discounted return-to-go, whitened
                 over the whole batch instead of per group.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from pipeline.algorithms.core import masked_sum, masked_whiten
from pipeline.registry import Registry


@dataclass
class AdvantageInputs:
    """What an estimator may read. Shapes use N sequences, T completion tokens."""

    token_rewards: torch.Tensor             # (N, T) float, the task score at the last valid token
    mask: torch.Tensor                      # (N, T) bool, True on completion tokens
    group_ids: torch.Tensor                 # (N,) long, prompt index; the G samples of a prompt share it
    values: Optional[torch.Tensor] = None   # (N, T) float critic value V(s_t) before each token, or None
    gamma: float = 1.0                      # discount per token
    lam: float = 1.0                        # GAE lambda: 1 -> Monte-Carlo returns minus V, 0 -> one-step TD
    scale_by_std: bool = True               # GRPO: divide by the group std (False = Dr.GRPO)
    eps: float = 1e-6                       # added to the group std so a group of equal scores gives 0, not NaN
    token_penalty: Optional[torch.Tensor] = None  # (N, T) float per-token reward term (-kl_coef * KL in reward)


Estimator = Callable[[AdvantageInputs], tuple[torch.Tensor, Optional[torch.Tensor]]]
ADVANTAGE_ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")


def compute_advantages(name: str, inp: AdvantageInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the estimator registered as `name` (unknown name -> KeyError listing the valid ones).

    A per-token penalty (the KL in the reward) joins the token rewards of the per-token estimators (GAE,
    REINFORCE++). The group estimators compare task scores within a group and then add the penalty's
    return-to-go, A_t = group-relative score + sum_{t' >= t} gamma^(t'-t) penalty_t' (OpenRLHF's order):
    summed into the score first, a group of equal task scores would take its std from the KL alone and
    normalise any kl_coef, 1e-4 or 1, to the same O(1) advantages."""
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    meta = ADVANTAGE_ESTIMATORS.meta(name)
    if meta.get("needs_critic") and inp.values is None:
        raise ValueError(f"advantage estimator {name!r} needs critic values, but inp.values is None")
    if inp.token_penalty is None:
        return estimator(inp)
    if meta.get("needs_groups"):
        advantages, returns = estimator(replace(inp, token_penalty=None))
        return advantages + discounted_returns(inp.token_penalty, inp.mask, inp.gamma), returns
    return estimator(replace(inp, token_rewards=inp.token_rewards + inp.token_penalty, token_penalty=None))


def place_sequence_reward(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's score on its last valid token.

    scores: (N,) float, mask: (N, T) bool -> (N, T) float, zero elsewhere; a row with no valid token is all 0.
    """
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (T,) -> (N, T)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (N,) index of the last True, -1 if none
    has_token = last >= 0
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    values = torch.where(has_token, scores, torch.zeros_like(scores))
    return out.scatter(1, last.clamp(min=0).unsqueeze(1), values.unsqueeze(1))  # (N, 1) into (N, T)


def gae_advantages_and_returns(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unwhitened GAE advantages and returns = advantages + values.

    token_rewards, values: (N, T) float, mask: (N, T) bool -> ((N, T), (N, T)), both 0 at masked positions.
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1}
    with V and A after a sequence's last valid token taken as 0 (the episode ends at EOS). The loop runs
    backwards over T only, all N sequences at once. Masked positions are skipped: they carry the next
    valid token's V and A through unchanged, which for right padding means the tail stays at 0.
    """
    N, T = token_rewards.shape
    zero = torch.zeros(N, dtype=token_rewards.dtype, device=token_rewards.device)
    next_value, next_adv = zero, zero  # (N,) each: V and A of the next valid token
    advantages = torch.zeros_like(token_rewards)
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, adv_t, zero)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def _sequence_scores(inp: AdvantageInputs) -> torch.Tensor:
    """Outcome score per sequence: (N, T) token rewards -> (N,) sum over valid tokens."""
    return masked_sum(inp.token_rewards, inp.mask, dim=-1)


def _broadcast_over_tokens(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) per-sequence advantage -> (N, T), copied to valid tokens and 0 elsewhere."""
    return torch.where(mask, per_seq.unsqueeze(1), torch.zeros((), dtype=per_seq.dtype, device=per_seq.device))


def _group_sums(x: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group sums without a Python loop over groups; ids need not be contiguous or sorted.

    x: (N,) float, group_ids: (N,) long -> (group of each row (N,) in 0..K-1, sums (K,), counts (K,)).
    """
    _, group = torch.unique(group_ids, return_inverse=True)  # arbitrary ids -> dense 0..K-1
    K = int(group.max()) + 1 if group.numel() else 0
    sums = torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, group, x)
    counts = torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(x))
    return group, sums, counts


@ADVANTAGE_ESTIMATORS.register("gae", needs_critic=True)
def gae(inp: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, then advantages whitened over the batch's valid tokens; returns are left unwhitened."""
    if inp.values is None:
        raise ValueError("GAE needs critic values (inp.values is None)")
    advantages, returns = gae_advantages_and_returns(inp.token_rewards, inp.values, inp.mask, inp.gamma, inp.lam)
    return masked_whiten(advantages, inp.mask), returns


@ADVANTAGE_ESTIMATORS.register("grpo", needs_critic=False, needs_groups=True)
def grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """(score - group mean) / (group std + eps), or (score - group mean) when scale_by_std is False.

    The std is the unbiased one (torch.std default, as TRL). A group of one sample has no spread: its
    std is taken as 0 rather than NaN, and its advantage is 0 since it equals its own mean.
    """
    scores = _sequence_scores(inp)  # (N,)
    group, sums, counts = _group_sums(scores, inp.group_ids)
    mean = sums / counts  # (K,)
    centred = scores - mean[group]  # (N,)
    if inp.scale_by_std:
        sq_sums = torch.zeros_like(sums).index_add_(0, group, centred**2)  # (K,)
        std = (sq_sums / (counts - 1).clamp(min=1)).sqrt()  # (K,) Bessel-corrected
        centred = centred / (std[group] + inp.eps)
    return _broadcast_over_tokens(centred, inp.mask), None


@ADVANTAGE_ESTIMATORS.register("dr_grpo", needs_critic=False, needs_groups=True)
def dr_grpo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """GRPO with scale_by_std forced off: score - group mean (Dr.GRPO drops the std's difficulty bias)."""
    return grpo(replace(inp, scale_by_std=False))


@ADVANTAGE_ESTIMATORS.register("rloo", needs_critic=False, needs_groups=True)
def rloo(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """score_i - mean of the other G-1 scores of its group (equals G/(G-1) (score_i - group mean)).

    A group of one sample has no other sample to form a baseline; like GRPO it gets advantage 0.
    """
    scores = _sequence_scores(inp)  # (N,)
    group, sums, counts = _group_sums(scores, inp.group_ids)
    others = counts[group] - 1  # (N,) size of the leave-one-out set
    baseline = (sums[group] - scores) / others.clamp(min=1)
    per_seq = torch.where(others > 0, scores - baseline, torch.zeros_like(scores))
    return _broadcast_over_tokens(per_seq, inp.mask), None


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go G_t = r_t + gamma G_{t+1} over valid tokens: (N, T) float, (N, T) bool -> (N, T), 0 where
    masked. Same backward loop over T as GAE: masked positions carry the running return through unchanged."""
    N, T = token_rewards.shape
    running = torch.zeros(N, dtype=token_rewards.dtype, device=token_rewards.device)  # (N,)
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(T)):
        running = torch.where(mask[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    return returns


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", needs_critic=False)
def reinforce_pp(inp: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """Discounted return-to-go per token (`discounted_returns`), whitened over all valid tokens."""
    return masked_whiten(discounted_returns(inp.token_rewards, inp.mask, inp.gamma), inp.mask), None
