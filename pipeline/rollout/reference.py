"""The reference policy: the frozen initial policy behind the reference actor, giving log pi_ref of each
completion token for the KL term. Runs, and is tested, without Ray."""
from __future__ import annotations

import torch

from pipeline.batch import Rollout
from pipeline.config import ModelConfig
from pipeline.models import completion_forward, load_causal_lm
from pipeline.torch_env import resolve_device, setup_torch


def load_reference_model(model_cfg: ModelConfig, device) -> torch.nn.Module:
    """The frozen initial policy (`model.path` in `model.dtype`), in eval mode, without gradients: the
    reference actor's model, or the one sharded learners hold between them."""
    model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=device,
                           disable_dropout=model_cfg.disable_dropout)
    model.eval()
    model.requires_grad_(False)
    return model


class ReferencePolicy:
    def __init__(self, model_cfg: ModelConfig, temperature: float, threads: int = 1):
        setup_torch(threads)
        self.temperature = temperature
        self.device = resolve_device(model_cfg.device)
        self.model = load_reference_model(model_cfg, self.device)

    @torch.no_grad()
    def logprobs(self, r: Rollout) -> torch.Tensor:
        """(N, T) float32 log-probs of the completion tokens under the reference."""
        d = self.device
        out = completion_forward(self.model, r.prompt_ids.to(d), r.prompt_mask.to(d), r.completion_ids.to(d),
                                 r.completion_mask.to(d), temperature=self.temperature)
        return out["logprobs"].float().cpu()
