"""Masked reductions, KL estimators, policy/value losses and log-prob helpers.

Pure functions over tensors; sizes follow `pipeline.batch`: N sequences, T completion tokens (right-padded),
V vocabulary. Every `mask` is (N, T) bool and only True positions carry meaning: masked positions may hold
garbage (even NaN), so reductions select with `torch.where` instead of multiplying by the mask.

Variants implemented:
- PPO-clip surrogate (Schulman et al. 2017, arXiv:1707.06347) with the asymmetric "clip-higher" upper bound
  of DAPO (Yu et al. 2025, arXiv:2503.14476) and the dual-clip for negative advantages (Ye et al. 2020,
  arXiv:1912.09729), in the form verl uses.
- Clipped value loss as in OpenAI baselines / OpenRLHF `ValueLoss`.
- Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"): when an engine samples and the learner recomputes pi_old, the samples came from
  the engine's slightly different distribution; each token's loss is weighted by min(pi_old / pi_engine, C).
- KL estimators k1, k2, k3 from Schulman, "Approximating KL Divergence" (2020,
  http://joschu.net/blog/kl-approx.html), and verl's straight-through "k3+". Which fits where:
    in the reward (a value, no gradient through it): k1 (unbiased, the InstructGPT / OpenRLHF choice) or k3;
    in the loss (its gradient is what regularises): k2, whose gradient is exactly that of KL(pi || ref);
    k3, whose gradient is exactly that of the forward KL(ref || pi) (GRPO's choice); or k3+, k3's value with
    k2's gradient. k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0): it regularises nothing,
    so the config refuses it there.
- Loss aggregation: token-mean (DAPO / TRL default), seq-mean-token-mean (original GRPO, Shao et al. 2024),
  seq-mean-token-sum-norm (Dr.GRPO, Liu et al. 2025, arXiv:2503.20783): each sequence's token sum divided by
  a constant, the generation budget, not by the step's longest completion.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pipeline.registry import Registry

# exp() of a log-ratio beyond +-20 is either ~5e8 or ~2e-9: no useful signal, and past ~88 it overflows
# float32 to inf, which turns into NaN in the loss. Both the KL and the importance ratio clamp first.
LOG_RATIO_CLAMP = 20.0


def _lookup(registry: Registry, name: str) -> Callable:
    """Registry lookup that reports a bad option value as ValueError (a config typo, not a missing key)."""
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; valid names: {', '.join(registry.names())}")
    return registry.get(name)


# ----------------------------------------------------------------------------------------- reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of `x` over True positions of `mask`.

    x: (N, T) float (any shape), mask: same shape bool. dim=None -> scalar, else that dim is reduced.
    """
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `x` over True positions; 0 (not NaN) where nothing is selected.

    x: (N, T) float, mask: (N, T) bool. dim=None -> scalar, dim=-1 -> (N,) per-sequence means.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over True positions (Bessel-corrected by default, like OpenRLHF `masked_var`).

    x: (N, T) float, mask: (N, T) bool. With fewer than 2 selected values the unbiased estimate is undefined;
    we return the biased one (0 for a single value, 0 for none) rather than NaN/inf.
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)  # (N,) -> (N, 1) so it broadcasts back over the reduced dim
    var = masked_mean((x - mean) ** 2, mask, dim)
    if unbiased:
        count = (mask.sum() if dim is None else mask.sum(dim)).to(x.dtype)
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over all True positions of the batch; masked positions come back as 0.

    x: (N, T) float, mask: (N, T) bool -> (N, T). shift_mean=False keeps the original mean (only rescales),
    as OpenRLHF / DeepSpeed-Chat offer. The 1e-8 inside the rsqrt keeps a constant batch finite.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ----------------------------------------------------------------------------------------- KL estimators

KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # log r = log pi - log pi_ref: unbiased for KL(pi || pi_ref) under samples from pi, but high variance
    # and negative on individual tokens.
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def _kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # 0.5 (log r)^2: biased but low variance and >= 0; its gradient matches the true KL's to first order.
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def _kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # (r - 1) - log r with r = pi_ref / pi: unbiased, low variance, >= 0 (GRPO's choice).
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio) - log_ratio - 1.0


@KL_ESTIMATORS.register("k3+")
def _kl_k3_plus(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # Straight-through (verl's "k3+"): the value of k3 (unbiased, >= 0) with the gradient of k2, which is
    # exactly the gradient of KL(pi || pi_ref) -- the reverse KL the penalty is meant to control.
    k2 = _kl_k2(logprobs, ref_logprobs)
    return _kl_k3(logprobs, ref_logprobs).detach() + k2 - k2.detach()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens' log-probs.

    logprobs, ref_logprobs: (N, T) float -> (N, T) float, unmasked (the caller applies its mask).
    estimator: "k1" | "k2" | "k3" | "k3+" (see the module docstring for which belongs in the reward and which
    in the loss); anything else -> ValueError listing names.
    """
    return _lookup(KL_ESTIMATORS, estimator)(logprobs, ref_logprobs)


# ----------------------------------------------------------------------------------------- aggregation

LOSS_AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token-mean", needs_norm=False)
def _agg_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm: Optional[float]) -> torch.Tensor:
    # Every valid token of the batch weighs the same, so long answers are not down-weighted (DAPO).
    return masked_mean(loss_mat, mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean", needs_norm=False)
def _agg_seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm: Optional[float]) -> torch.Tensor:
    # Original GRPO: each sequence weighs the same, its tokens share that weight (length bias, Dr.GRPO).
    per_seq = masked_mean(loss_mat, mask, dim=-1)  # (N,)
    return masked_mean(per_seq, mask.any(dim=-1))  # sequences with no valid token are left out


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm", needs_norm=True)
def _agg_seq_mean_token_sum_norm(loss_mat: torch.Tensor, mask: torch.Tensor, norm: Optional[float]) -> torch.Tensor:
    # Dr.GRPO: divide each sequence's token sum by one constant for the whole run (the generation budget)
    # instead of its own length, which removes the length bias of seq-mean-token-mean. Not the padded T:
    # T is the step's longest completion, so the gradient scale would follow one outlier sample.
    per_seq = masked_sum(loss_mat, mask, dim=-1) / norm  # (N,)
    return masked_mean(per_seq, mask.any(dim=-1))


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, norm: Optional[float] = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    loss_mat: (N, T) float, mask: (N, T) bool -> () float. mode: "token-mean" | "seq-mean-token-mean" |
    "seq-mean-token-sum-norm" (see the module docstring); anything else -> ValueError listing names.
    `norm` is the constant seq-mean-token-sum-norm divides by (the generation budget, e.g. max_new_tokens);
    that mode refuses to run without it. A batch with no valid token gives 0.
    """
    fn = _lookup(LOSS_AGGREGATIONS, mode)
    if LOSS_AGGREGATIONS.meta(mode)["needs_norm"] and not norm:
        raise ValueError(f"loss aggregation {mode!r} divides by a constant: pass norm= (the generation budget)")
    return fn(loss_mat, mask, norm)


# ----------------------------------------------------------------------------------------- losses


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    norm: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate loss (to minimise), with DAPO clip-higher and optional dual-clip.

    logprobs: (N, T) float, log pi_theta(token), carries the gradient.
    old_logprobs: (N, T) float, log pi_old(token) (the sampler's, a learner pass's or the update's own, detached);
    advantages: (N, T) float; mask: (N, T) bool.
    ratio r = exp(logprobs - old_logprobs); per token
        loss = max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range_high))    (clip_range_high defaults to clip_range)
    and with dual_clip = c > 1, for A < 0 only: loss = min(loss, -A c), bounding the loss when r >> 1 (Ye et al.).
    token_weights: (N, T) float without gradient (e.g. `truncated_importance_weights`) multiply each token's loss.
    Returns (scalar loss aggregated by `agg` (`norm`: see `aggregate_loss`), stats) with stats as Python floats over valid tokens:
    clip_frac (the clipped term was the larger one), dual_clip_frac (the dual bound was active),
    approx_kl (mean 0.5 (log r)^2), ratio_mean.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + high)
    loss_mat = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        pg_dual = -advantages * dual_clip
        dual_active = (advantages < 0) & (pg_dual < loss_mat)
        loss_mat = torch.where(advantages < 0, torch.minimum(loss_mat, pg_dual), loss_mat)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights
    loss = aggregate_loss(loss_mat, mask, agg, norm)

    with torch.no_grad():
        # .item() is a device sync; it happens once per micro-batch, after the loss is built.
        stats = {
            "clip_frac": masked_mean(clipped.float(), mask).item(),
            "dual_clip_frac": masked_mean(dual_active.float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def truncated_importance_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """(N, T) min(pi_old / pi_sampler, cap) per token, without gradient (TIS, see the module docstring).

    old_logprobs: the learner's log pi_old; sampler_logprobs: the log-probs the engine sampled with. The cap
    bounds the variance a token the engine under-sampled would add; tokens the engine over-sampled get < 1."""
    log_ratio = (old_logprobs - sampler_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio).clamp(max=cap)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: Optional[float] = None,
    agg: str = "token-mean",
    norm: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic loss 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), PPO's value clipping.

    values: (N, T) float with gradient; old_values, returns: (N, T) float; mask: (N, T) bool.
    value_clip=None -> plain 0.5 (v - R)^2. Returns (scalar loss, {"value_clip_frac": fraction of valid
    tokens where the clipped term was the larger one}).
    """
    unclipped = (values - returns) ** 2
    if value_clip is None:
        loss_mat = unclipped
        clipped = torch.zeros_like(mask)
    else:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped_sq = (v_clipped - returns) ** 2
        loss_mat = torch.maximum(unclipped, clipped_sq)
        clipped = clipped_sq > unclipped
    loss = 0.5 * aggregate_loss(loss_mat, mask, agg, norm)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean(clipped.float(), mask).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------- logits helpers


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim: (..., V) -> (...) float32.

    H = -sum p log p with log p = log_softmax (a logsumexp, so large logits do not overflow). Logits of -inf
    (masked vocabulary, e.g. a tokenizer's unused ids) have p = 0 and contribute 0; `nan_to_num` stops
    0 * -inf from becoming NaN in the value or the gradient. Computed in float32.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `token_ids`, in float32.

    logits: (N, T, V) float, token_ids: (N, T) long -> (N, T) float32.
    Computed as logit[token] - logsumexp(logits) so no (N, T, V) log-softmax is kept. Half-precision logits
    (a bf16 forward) are upcast one sequence at a time, before the temperature (as OpenRLHF does):
    logsumexp in bf16 loses ~2 decimal digits, and a whole-batch float32 copy of (N, T, V) is what we are
    trying not to allocate. The temperature must match the sampler's or ratios are biased.
    """
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float() / temperature  # (N, T)
    if logits.dtype in (torch.float32, torch.float64):
        scaled = logits / temperature if temperature != 1.0 else logits
        return picked - torch.logsumexp(scaled, dim=-1)
    lse = torch.stack([torch.logsumexp(row.float() / temperature, dim=-1) for row in logits])  # N x (T,) -> (N, T)
    return picked - lse


def shard_weight(shard_mask: torch.Tensor, full_mask: torch.Tensor, mode: str) -> float:
    """Weight of one shard's aggregated loss when a minibatch is split into shards: across data-parallel
    learners, and into micro-batches within a learner.

    shard_mask: (n, T) bool, the shard's rows of full_mask: (N, T) bool. Summing
    `shard_weight(shard_k) * aggregate_loss(loss_k, shard_k, mode)` over the shards gives
    `aggregate_loss(loss, full, mode)` exactly, so accumulating (and all-reducing) the shards' gradients
    reproduces the gradient of the whole minibatch in one pass. token-mean weighs by valid tokens, the sequence means by valid sequences.
    A minibatch with no valid token gives 0.
    """
    _lookup(LOSS_AGGREGATIONS, mode)
    if mode == "token-mean":
        part, whole = shard_mask.sum(), full_mask.sum()
    else:
        part, whole = shard_mask.any(dim=-1).sum(), full_mask.any(dim=-1).sum()
    return float(part) / float(whole) if whole > 0 else 0.0
