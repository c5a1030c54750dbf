"""Reward-model losses from preference pairs.

Bradley-Terry (Bradley & Terry 1952; the reward-model loss of InstructGPT, Ouyang et al. 2022, and
DeepSpeed-Chat step 2): P(chosen > rejected) = sigmoid(r_c - r_r), trained by its negative log-likelihood.
With a margin m per pair (Llama 2, Touvron et al. 2023, arXiv:2307.09288): -log sigmoid(r_c - r_r - m), which
asks for a larger gap where annotators were surer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """chosen, rejected: (N,) scores of each pair's two responses; margin: (N,) or None -> mean NLL, a scalar.
    logsigmoid keeps it finite for any gap (softplus(-x) = -logsigmoid(x))."""
    gap = chosen.float() - rejected.float()
    if margin is not None:
        gap = gap - margin.float()
    return -F.logsigmoid(gap).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher (a tie counts as wrong)."""
    return float((chosen > rejected).float().mean())
