"""Unit tests for pipeline.algorithms: every loss and estimator against values worked out by hand."""
import math
import random
from dataclasses import replace

import pytest
import torch

from pipeline.algorithms import (
    ADVANTAGE_ESTIMATORS, AdvantageInputs, aggregate_loss, clipped_policy_loss, clipped_value_loss,
    truncated_importance_weights,
    compute_advantages, entropy_from_logits, gae_advantages_and_returns, kl_penalty, logprobs_from_logits,
    masked_mean, masked_sum, masked_var, masked_whiten, place_sequence_reward,
)

pytestmark = pytest.mark.unit

T_, F_ = True, False


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=atol, rtol=0)


def test_masked_reductions_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 100.0, 100.0]])  # NaN under the mask must not leak
    mask = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    close(masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(masked_mean(x, mask), 7.0 / 3)
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    # mean 7/3; squared deviations (16 + 1 + 25) / 9 = 42/9; unbiased /2 -> 7/3
    close(masked_var(x, mask), 7.0 / 3)
    close(masked_var(x, mask, unbiased=False), 42.0 / 27)
    # per row: row 0 {1, 2} -> unbiased 0.5; row 1 a single value -> 0, not NaN
    close(masked_var(x, mask, dim=-1), [0.5, 0.0])


def test_masked_reductions_empty_mask_give_zero():
    x = torch.randn(2, 3)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert masked_mean(x, none).item() == 0.0
    assert masked_var(x, none).item() == 0.0
    close(masked_mean(x, none, dim=-1), [0.0, 0.0])
    assert torch.equal(masked_whiten(x, none), torch.zeros(2, 3))


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 2.0, 9.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, T_, F_]])
    # valid {1, 2, 4, 2}: mean 2.25, deviations -1.25 -0.25 1.75 -0.25, sq sum 4.75, unbiased var 4.75/3
    std = math.sqrt(4.75 / 3)
    close(masked_whiten(x, mask), [[-1.25 / std, -0.25 / std, 0.0], [1.75 / std, -0.25 / std, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[-1.25 / std + 2.25, -0.25 / std + 2.25, 0.0],
                                                     [1.75 / std + 2.25, -0.25 / std + 2.25, 0.0]])


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])  # logp - ref
    close(kl_penalty(logp, ref, "k2"), [[0.125, 0.5]])  # 0.5 * 0.5^2, 0.5 * 1^2
    # d = ref - logp = [-0.5, 1.0]; exp(d) - d - 1 = [0.60653066 + 0.5 - 1, 2.71828183 - 2]
    close(kl_penalty(logp, ref, "k3"), [[0.10653066, 0.71828183]])


def test_k3_clamps_log_ratio():
    logp = torch.tensor([[0.0, -1000.0]])
    ref = torch.tensor([[-1000.0, 0.0]])
    k3 = kl_penalty(logp, ref, "k3")
    # d clamped to -20 and +20: exp(-20) + 20 - 1 and exp(20) - 21, both finite
    close(k3, [[math.exp(-20) + 19.0, math.exp(20) - 21.0]], atol=1e-3 * math.exp(20))
    assert torch.isfinite(k3).all()


LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = torch.tensor([[T_, T_, F_], [T_, F_, F_], [F_, F_, F_]])  # third sequence has no valid token


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 7.0 / 3),  # (1 + 2 + 4) / 3 valid tokens
    ("seq-mean-token-mean", 2.75),  # row means 1.5 and 4, empty row ignored: (1.5 + 4) / 2
    ("seq-mean-token-sum-norm", 7.0 / 6),  # row sums / T=3: 1 and 4/3, mean over 2 rows
])
def test_aggregate_loss_modes(mode, expected):
    close(aggregate_loss(LOSS_MAT, AGG_MASK, mode, norm=3), expected)
    assert aggregate_loss(LOSS_MAT, torch.zeros(3, 3, dtype=torch.bool), mode, norm=3).item() == 0.0


def test_dr_grpo_normaliser_is_a_constant_not_the_longest_completion():
    # The same two sequences (3 and 2 valid tokens, loss 1 each) in a step padded to T=3 and to T=8: Dr.GRPO
    # divides token sums by the generation budget (here 8), so the padding of the step must not matter.
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    short = aggregate_loss(torch.ones(2, 3), mask, "seq-mean-token-sum-norm", norm=8)
    long = aggregate_loss(torch.ones(2, 8), torch.nn.functional.pad(mask, (0, 5)), "seq-mean-token-sum-norm", norm=8)
    close(short, (3 / 8 + 2 / 8) / 2)
    close(long, short)
    with pytest.raises(ValueError, match="divides by a constant"):
        aggregate_loss(torch.ones(2, 3), mask, "seq-mean-token-sum-norm")


def test_k3_plus_has_k3_value_and_the_reverse_kl_gradient_of_k2():
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.3]])
    value = kl_penalty(logp, ref, "k3+")
    close(value, kl_penalty(logp.detach(), ref, "k3"))
    value.sum().backward()
    expected = torch.autograd.grad(kl_penalty(logp, ref, "k2").sum(), logp)[0]
    close(logp.grad, expected)                             # d/dlogp 0.5 (logp - ref)^2 = logp - ref


def test_expected_kl_gradients_k1_none_k2_reverse_k3_forward():
    """Exact expectations over a 5-way categorical pi (float64): what each estimator's gradient optimises
    when it sits in the loss. k1: nothing (E[grad log pi] = 0, so the config refuses it there)."""
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        per_token = kl_penalty(logp.unsqueeze(0), ref.unsqueeze(0), estimator).squeeze(0)   # value at each token
        p = logp.exp().detach()
        return torch.autograd.grad((p * per_token).sum() + 0 * theta.sum(), theta)[0]       # E_pi, pi fixed

    def grad_of(kl):
        return torch.autograd.grad(kl(torch.log_softmax(theta, -1)), theta)[0]

    reverse = grad_of(lambda lp: (lp.exp() * (lp - ref)).sum())     # KL(pi || ref)
    forward = grad_of(lambda lp: (ref.exp() * (ref - lp)).sum())    # KL(ref || pi)
    assert expected_grad("k1").abs().max() < 1e-12
    close(expected_grad("k2"), reverse, atol=1e-12)
    close(expected_grad("k3"), forward, atol=1e-12)
    close(expected_grad("k3+"), reverse, atol=1e-12)


def test_unknown_kl_estimator_or_aggregation_lists_names():
    with pytest.raises(ValueError, match="k1, k2, k3, k3\\+"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")
    with pytest.raises(ValueError, match="seq-mean-token-mean, seq-mean-token-sum-norm, token-mean"):
        aggregate_loss(LOSS_MAT, AGG_MASK, "sum")


def _policy_case():
    # ratios r = [1.5, 0.5, 1.1, 0.5] on valid tokens, a wild masked 5th token
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]])
    old = torch.full((1, 5), -1.0)
    logp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[T_, T_, T_, T_, F_]])
    return logp, old, adv, mask


def test_clipped_policy_loss_by_hand():
    logp, old, adv, mask = _policy_case()
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    # tok0 r=1.5 A=+1: max(-1.5, -1.2) = -1.2 (clipped)   tok1 r=0.5 A=+1: max(-0.5, -0.8) = -0.5
    # tok2 r=1.1 A=-1: max(1.1, 1.1) = 1.1 (in range)       tok3 r=0.5 A=-1: max(0.5, 0.8) = 0.8 (clipped)
    close(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4)  # 0.05
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["dual_clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5) / 4, abs=1e-6)
    log_r = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]
    assert stats["approx_kl"] == pytest.approx(sum(0.5 * v * v for v in log_r) / 4, abs=1e-6)


def test_clipped_policy_loss_gradient_zero_on_clipped_tokens():
    logp, old, adv, mask = _policy_case()
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    # d(-A r)/d logp = -A r, divided by 4 tokens: tok1 -0.5/4, tok2 +1.1/4; clipped tok0/tok3 and masked tok4 get 0
    close(logp.grad, [[0.0, -0.125, 0.275, 0.0, 0.0]])
    assert logp.grad[0, 1] < 0  # A > 0: descending the loss raises the token's log-prob
    assert logp.grad[0, 2] > 0  # A < 0: descending the loss lowers it


def test_clip_higher_widens_only_the_upper_bound():
    logp, old, adv, mask = _policy_case()
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2, clip_range_high=0.28)
    # tok0 now clipped at 1.28: -1.28; tok3 still clipped at the lower bound 0.8
    close(loss, (-1.28 - 0.5 + 1.1 + 0.8) / 4)  # 0.03
    assert stats["clip_frac"] == pytest.approx(0.5)
    one = (torch.full((1, 1), math.log(1.25)), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert clipped_policy_loss(*one, 0.2)[1]["clip_frac"] == 1.0  # r = 1.25 > 1.2
    assert clipped_policy_loss(*one, 0.2, clip_range_high=0.28)[1]["clip_frac"] == 0.0  # 1.25 < 1.28


def test_dual_clip_bounds_negative_advantages():
    ratio = torch.tensor([[5.0, 2.0, 5.0]])
    old = torch.zeros(1, 3)
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=3.0)
    # tok0 A<0 r=5: max(5, 1.2) = 5, min(5, 3*1) = 3 (dual active)
    # tok1 A<0 r=2: max(2, 1.2) = 2, min(2, 3) = 2       tok2 A>0 r=5: max(-5, -1.2) = -1.2 (clipped)
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 2.0 / 3, 0.0]])  # only tok1 is unclipped: -A r / 3 = 2/3
    with pytest.raises(ValueError):
        clipped_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=0.5)


def test_policy_loss_huge_log_ratio_stays_finite():
    logp = torch.tensor([[100.0]], requires_grad=True)  # log r = 100 would overflow exp; clamped to 20
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), mask, 0.2)
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-6)  # A = -1: max(r, 1.2) = e^20
    assert stats["ratio_mean"] == pytest.approx(math.exp(20), rel=1e-6)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0, 50.0]])
    old = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_, F_]])
    # tok0: clip(1.0, 0.3, 0.7) = 0.7; (1-0)^2 = 1 vs 0.49 -> 1
    # tok1: clip(2.0, 0.8, 1.2) = 1.2; (2-3)^2 = 1 vs 3.24 -> 3.24 (clipped active)
    # tok2: unchanged, 1 vs 1 -> 1
    loss, stats = clipped_value_loss(values, old, returns, mask, value_clip=0.2)
    close(loss, 0.5 * (1.0 + 3.24 + 1.0) / 3)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)
    loss, stats = clipped_value_loss(values, old, returns, mask)
    close(loss, 0.5 * (1.0 + 1.0 + 1.0) / 3)
    assert stats["value_clip_frac"] == 0.0


def test_entropy_from_logits():
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -inf, 0.0, -inf], [0.0, math.log(3), -inf, -inf]])
    logits.requires_grad_(True)
    ent = entropy_from_logits(logits)
    # uniform over 4: ln 4; uniform over 2: ln 2; p = [1/4, 3/4]: -(0.25 ln 0.25 + 0.75 ln 0.75)
    close(ent, [math.log(4), math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    big = torch.tensor([[1000.0, 0.0]])  # would overflow a naive exp
    close(entropy_from_logits(big), [0.0])


def test_logprobs_from_logits():
    logits = torch.tensor([[[0.0, math.log(3)]]])  # (N=1, T=1, V=2), p = [0.25, 0.75]
    ids = torch.tensor([[1]])
    close(logprobs_from_logits(logits, ids), [[math.log(0.75)]])
    # temperature 2: logits [0, ln3 / 2] -> p1 = sqrt3 / (1 + sqrt3)
    close(logprobs_from_logits(logits, ids, temperature=2.0), [[math.log(math.sqrt(3) / (1 + math.sqrt(3)))]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, ids, 0.7), ref)
    low = logprobs_from_logits(logits.bfloat16(), ids, 0.7)  # upcast path
    assert low.dtype == torch.float32
    close(low, ref, atol=0.1)  # bf16 rounding of the logits themselves


def test_place_sequence_reward():
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_], [F_, F_, F_]])
    out = place_sequence_reward(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


GAE_REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
GAE_VALUES = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 7.0]])
GAE_MASK = torch.tensor([[T_, T_, T_], [T_, T_, F_]])  # row 1 padded: its 9.0 / 7.0 are garbage


def test_gae_by_hand():
    adv, ret = gae_advantages_and_returns(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    # row 0, gamma*lam = 0.72:
    #   d2 = 1 + 0 - 0.7 = 0.3                A2 = 0.3
    #   d1 = 0 + 0.9*0.7 - 0.6 = 0.03         A1 = 0.03 + 0.72*0.3 = 0.246
    #   d0 = 0 + 0.9*0.6 - 0.5 = 0.04         A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1 (last valid t=1, V after it is 0):
    #   d1 = 2 + 0 - 0.5 = 1.5                A1 = 1.5
    #   d0 = 0 + 0.9*0.5 - 1.0 = -0.55        A0 = -0.55 + 0.72*1.5 = 0.53
    close(adv, [[0.21712, 0.246, 0.3], [0.53, 1.5, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [1.53, 2.0, 0.0]])  # A + V on valid tokens


def _reference_gae(rewards, values, mask, gamma, lam):
    """Obvious double loop over sequences and their valid (right-padded) tokens."""
    N, T = rewards.shape
    adv = [[0.0] * T for _ in range(N)]
    for i in range(N):
        length = int(mask[i].sum())
        a_next = 0.0
        for t in reversed(range(length)):
            v_next = float(values[i, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[i, t]) + gamma * v_next - float(values[i, t])
            a_next = delta + gamma * lam * a_next
            adv[i][t] = a_next
    return torch.tensor(adv)


@pytest.mark.parametrize("seed", range(8))
def test_gae_matches_reference_loop(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    N, T = rng.randint(1, 7), rng.randint(1, 11)
    lengths = torch.tensor([rng.randint(0, T) for _ in range(N)])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # right-padded (N, T)
    rewards = torch.randn(N, T, generator=g)
    values = torch.randn(N, T, generator=g)
    gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
    adv, ret = gae_advantages_and_returns(rewards, values, mask, gamma, lam)
    expected = _reference_gae(rewards, values, mask, gamma, lam)
    close(adv, expected)
    close(ret, torch.where(mask, expected + values, 0.0))


def test_gae_estimator_whitens_and_needs_critic():
    rewards, mask = GAE_REWARDS, GAE_MASK
    inp = AdvantageInputs(rewards, mask, torch.tensor([0, 1]), values=GAE_VALUES, gamma=0.9, lam=0.8)
    adv, ret = compute_advantages("gae", inp)
    raw = torch.tensor([0.21712, 0.246, 0.3, 0.53, 1.5])  # from test_gae_by_hand
    whitened = (raw - raw.mean()) / raw.std()
    close(adv[mask], whitened)
    assert adv[1, 2] == 0.0
    close(ret, [[0.71712, 0.846, 1.0], [1.53, 2.0, 0.0]])
    assert ADVANTAGE_ESTIMATORS.meta("gae")["needs_critic"] is True
    with pytest.raises(ValueError, match="critic"):
        compute_advantages("gae", AdvantageInputs(rewards, mask, torch.tensor([0, 1])))


def _outcome_inputs(scores, group_ids, lengths, T=4, **kw):
    """Scores placed at the last token of right-padded sequences of the given lengths."""
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rewards = place_sequence_reward(torch.tensor(scores), mask)
    return AdvantageInputs(rewards, mask, torch.tensor(group_ids), **kw)


def test_grpo_by_hand():
    inp = _outcome_inputs([1.0, 2.0, 3.0, 0.0, 0.0, 3.0], [0, 0, 0, 1, 1, 1], [4, 2, 3, 1, 4, 2])
    adv, ret = compute_advantages("grpo", inp)
    assert ret is None
    # group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]
    # group 1: mean 1, deviations [-1, -1, 2], unbiased var (1 + 1 + 4) / 2 = 3 -> [-1, -1, 2] / sqrt(3)
    s3 = math.sqrt(3)
    per_seq = torch.tensor([-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3])
    close(adv, torch.where(inp.mask, per_seq.unsqueeze(1), 0.0))  # broadcast over valid tokens only
    adv, _ = compute_advantages("dr_grpo", inp)  # no std division: [-1, 0, 1], [-1, -1, 2]
    close(adv[:, 0], [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])
    close(compute_advantages("grpo", replace(inp, scale_by_std=False))[0], adv)  # the flag does the same


def test_grpo_equal_scores_and_singleton_groups_give_zero():
    inp = _outcome_inputs([1.0, 1.0, 5.0], [0, 0, 1], [2, 3, 1])  # group 0 all equal, group 1 alone
    adv, _ = compute_advantages("grpo", inp)
    assert torch.equal(adv, torch.zeros(3, 4))


def test_grpo_non_contiguous_groups_match_sorted():
    g = torch.Generator().manual_seed(3)
    group_ids = torch.tensor([5, 2, 5, 9, 2, 9, 5, 2, 9])
    scores = torch.randn(9, generator=g)
    mask = torch.ones(9, 2, dtype=torch.bool)
    adv, _ = compute_advantages("grpo", AdvantageInputs(place_sequence_reward(scores, mask), mask, group_ids))
    order = torch.argsort(group_ids, stable=True)
    adv_sorted, _ = compute_advantages(
        "grpo", AdvantageInputs(place_sequence_reward(scores[order], mask), mask, group_ids[order])
    )
    close(adv[order], adv_sorted)
    grouped = scores[order].view(3, 3)  # sorted -> (B=3 prompts, G=3 samples)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
    close(adv_sorted[:, 0], expected.reshape(9))


def test_rloo_by_hand():
    inp = _outcome_inputs([1.0, 2.0, 3.0, 0.0, 0.0, 3.0], [7, 7, 7, 4, 4, 4], [1, 2, 3, 4, 1, 2])
    adv, ret = compute_advantages("rloo", inp)
    assert ret is None
    # group 7: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 4: 0 - (0+3)/2 = -1.5, 0 - (0+3)/2 = -1.5, 3 - (0+0)/2 = 3
    per_seq = torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])
    close(adv, torch.where(inp.mask, per_seq.unsqueeze(1), 0.0))
    single, _ = compute_advantages("rloo", _outcome_inputs([4.0], [0], [2]))
    assert torch.equal(single, torch.zeros(1, 4))


def test_kl_in_reward_keeps_its_scale_in_group_estimators():
    """GRPO normalises the task score per group, then adds the KL penalty's return-to-go (OpenRLHF's order):
    a group of equal task scores gets only the penalty, scaled by kl_coef, not a KL divided by its own std."""
    mask = torch.tensor([[T_, T_], [T_, F_]])
    scores = place_sequence_reward(torch.tensor([0.0, 0.0]), mask)     # an all-wrong group
    kl = torch.tensor([[0.2, 0.4], [0.6, 9.0]])                        # the masked 9.0 must not count
    for coef in (1e-4, 1.0):
        inp = AdvantageInputs(scores, mask, torch.tensor([0, 0]), token_penalty=-coef * kl * mask)
        adv, _ = compute_advantages("grpo", inp)
        # normalised score 0 for both; return-to-go of -coef*kl: row 0 [-(0.2+0.4), -0.4], row 1 [-0.6, 0]
        close(adv, [[-0.6 * coef, -0.4 * coef], [-0.6 * coef, 0.0]], atol=1e-7)
    # scores [1, 0]: normalised [1/sqrt(2), -1/sqrt(2)] (std sqrt(1/2)), then the penalty's return-to-go
    inp = AdvantageInputs(place_sequence_reward(torch.tensor([1.0, 0.0]), mask), mask, torch.tensor([0, 0]),
                          token_penalty=-0.5 * kl * mask, gamma=0.5)
    adv, _ = compute_advantages("grpo", inp)
    a = 0.5 / math.sqrt(0.5) / (1 + 1e-6 / math.sqrt(0.5))             # (1 - 0.5) / (std + eps)
    close(adv, [[a - 0.5 * (0.2 + 0.5 * 0.4), a - 0.5 * 0.4], [-a - 0.5 * 0.6, 0.0]])
    # RLOO likewise; per-token estimators take the penalty into their token rewards (unchanged behaviour)
    rloo, _ = compute_advantages("rloo", replace(inp, gamma=1.0))
    close(rloo, [[1.0 - 0.3, 1.0 - 0.2], [-1.0 - 0.3, 0.0]])
    plain = AdvantageInputs(inp.token_rewards + inp.token_penalty, mask, inp.group_ids, gamma=0.5)
    close(compute_advantages("reinforce_pp", inp)[0], compute_advantages("reinforce_pp", plain)[0])


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 4.0], [0.0, 2.0, 8.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    inp = AdvantageInputs(rewards, mask, torch.tensor([0, 0]), gamma=0.5)
    adv, ret = compute_advantages("reinforce_pp", inp)
    assert ret is None
    # returns-to-go: row 0 [1, 2, 4], row 1 [1, 2] (padding's 8 ignored)
    # valid {1, 2, 4, 1, 2}: mean 2, deviations [-1, 0, 2, -1, 0], sq sum 6, unbiased var 1.5
    s = math.sqrt(1.5)
    close(adv, [[-1 / s, 0.0, 2 / s], [-1 / s, 0.0, 0.0]])


def test_masked_hole_is_skipped_not_a_step():
    # A masked position inside a sequence (e.g. tool output) is skipped: no reward, no discount step.
    rewards = torch.tensor([[0.0, 100.0, 1.0]])
    values = torch.tensor([[0.5, 99.0, 0.7]])
    mask = torch.tensor([[T_, F_, T_]])
    adv, _ = gae_advantages_and_returns(rewards, values, mask, gamma=0.9, lam=0.8)
    # t2: A = 1 - 0.7 = 0.3;  t0: d = 0 + 0.9*0.7 - 0.5 = 0.13, A = 0.13 + 0.72*0.3 = 0.346
    close(adv, [[0.346, 0.0, 0.3]])
    mask = torch.tensor([[T_, F_, T_, T_]])
    inp = AdvantageInputs(torch.tensor([[0.0, 100.0, 0.0, 4.0]]), mask, torch.tensor([0]), gamma=0.5)
    adv, _ = compute_advantages("reinforce_pp", inp)
    # returns-to-go [0.5*2, -, 0.5*4, 4] = [1, -, 2, 4]; mean 7/3, deviations [-4/3, -1/3, 5/3],
    # sq sum 42/9, unbiased var 7/3
    s = math.sqrt(7 / 3)
    close(adv, [[-4 / 3 / s, 0.0, -1 / 3 / s, 5 / 3 / s]])


def test_estimator_registry():
    with pytest.raises(KeyError, match="dr_grpo, gae, grpo, reinforce_pp, rloo"):
        compute_advantages("ppo2", _outcome_inputs([1.0], [0], [1]))
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda inp: (inp.token_rewards, None))
    assert ADVANTAGE_ESTIMATORS.get("grpo").__name__ == "grpo"  # the original survives
    assert {n: ADVANTAGE_ESTIMATORS.meta(n)["needs_critic"] for n in ADVANTAGE_ESTIMATORS} == {
        "dr_grpo": False, "gae": True, "grpo": False, "reinforce_pp": False, "rloo": False,
    }


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.3)]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.3)]])
    # pi_old / pi_sampler = 2.0, 0.5, 1.0; the cap 1.5 truncates the first
    close(truncated_importance_weights(old, sampler, cap=1.5), [[1.5, 0.5, 1.0]])


def test_token_weights_scale_each_tokens_policy_loss():
    logp, old, adv, mask = _policy_case()
    weights = torch.tensor([[2.0, 0.0, 1.0, 0.5, 9.0]])
    loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_range=0.2, token_weights=weights)
    # the per-token losses of test_clipped_policy_loss_by_hand (-1.2, -0.5, 1.1, 0.8), weighted; tok4 masked
    close(loss, (2.0 * -1.2 + 0.0 * -0.5 + 1.0 * 1.1 + 0.5 * 0.8) / 4)
    loss.backward()
    close(logp.grad, [[0.0, 0.0, 0.275, 0.0, 0.0]])   # weight 0 removes tok1's gradient; tok2's keeps weight 1
