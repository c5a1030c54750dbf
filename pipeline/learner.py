"""The learner: PPO-family updates of the policy (and critic) on one step's scored batch.

Runs without Ray; `actors.Learner` is its remote shell. The losses come from `pipeline.algorithms.core`;
this class only owns models, optimizers and the minibatch loop.

Data parallel: K learners (ranks) each hold the whole batch and walk the same minibatch order; each
takes its slice of every minibatch, weighs its loss by its share of the minibatch (`shard_weight`) and
the gradients are summed over the "learners" group before clipping and the optimizer step, so K ranks
take exactly the step one learner would take on the whole minibatch, and stay identical.
"""
from __future__ import annotations

import math
import os

import torch

from pipeline.algorithms.advantages import ADVANTAGE_ESTIMATORS
from pipeline.algorithms.core import (aggregate_loss, clipped_policy_loss, clipped_value_loss, kl_penalty,
                                      masked_mean, shard_weight)
from pipeline.batch import Rollout, TrainBatch
from pipeline.collective import GroupMember, all_reduce_grads, send_weights, weights_spec
from pipeline.config import RunConfig
from pipeline.weights import WeightsPacket, model_checksum, pack_weights
from pipeline.workers import resolve_device, setup_torch

DP_GROUP = "learners"      # the K data-parallel learners
SYNC_GROUP = "weights"     # learner rank 0 and every generator


class Learner(GroupMember):
    def __init__(self, cfg: RunConfig, threads: int = 1, rank: int = 0, world_size: int = 1):
        from pipeline.models import CriticModel, load_causal_lm

        setup_torch(threads, cfg.train.seed)   # same seed on every rank: identical initial value heads
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(cfg.model.device)
        self.policy = load_causal_lm(cfg.model.path, dtype=cfg.model.dtype, device=self.device)
        self.policy.train()
        self.version = 0
        self.critic = self.value_head = self.critic_opt = None
        needs_critic = ADVANTAGE_ESTIMATORS.meta(cfg.algorithm.name).get("needs_critic", False)
        policy_params = list(self.policy.parameters())
        if needs_critic and cfg.model.critic == "shared":
            # A value head on the policy trunk, trained through the policy optimizer (value_coef weighs it).
            hidden = self.policy.config.hidden_size
            self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            policy_params += list(self.value_head.parameters())
        elif needs_critic:
            self.critic = CriticModel(cfg.model.critic_path or cfg.model.path).to(self.device)
            self.critic.train()
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.learner.critic_lr,
                                                weight_decay=cfg.learner.weight_decay)
        self.params = policy_params
        self.opt = torch.optim.AdamW(policy_params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)

    # ------------------------------------------------------------------------------------------ values
    def _forward(self, r: Rollout, idx: torch.Tensor | None = None, **want) -> dict:
        from pipeline.models import completion_forward

        sel = (lambda t: t if idx is None else t[idx])
        d = self.device
        return completion_forward(self.policy, sel(r.prompt_ids).to(d), sel(r.prompt_mask).to(d),
                                  sel(r.completion_ids).to(d), sel(r.completion_mask).to(d),
                                  temperature=self.cfg.rollout.temperature, **want)

    def _critic_values(self, r: Rollout, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T) value of the state before each completion token, from the separate critic."""
        sel = (lambda t: t if idx is None else t[idx])
        d = self.device
        ids = torch.cat([sel(r.prompt_ids), sel(r.completion_ids)], dim=1).to(d)
        mask = torch.cat([sel(r.prompt_mask), sel(r.completion_mask)], dim=1).to(d)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
        values = self.critic(ids, mask.long(), positions)     # (n, P+T)
        P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
        return values[:, P - 1:P + T - 1]                      # the positions that predict each completion token

    @torch.no_grad()
    def values(self, r: Rollout) -> torch.Tensor | None:
        """Rollout-time values (N, T), or None when the estimator needs no critic."""
        if self.critic is not None:
            return self._critic_values(r).float().cpu()
        if self.value_head is not None:
            hidden = self._forward(r, want_hidden=True)["hidden"]
            return self.value_head(hidden).squeeze(-1).float().cpu()
        return None

    # ------------------------------------------------------------------------------------------ update
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Epochs x minibatches of clipped policy (and value) updates. Returns mean metrics."""
        lc = self.cfg.learner
        r = batch.rollout
        if r.policy_version != self.version:
            raise RuntimeError(f"rollout from policy version {r.policy_version}, learner is at {self.version}: "
                               "a stale rollout in synchronous mode means weights were not synced")
        lr = lc.lr * min(1.0, (self.version + 1) / lc.warmup_steps) if lc.warmup_steps else lc.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        n = batch.num_sequences
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.version)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(lc.epochs):
            for full in torch.randperm(n, generator=gen).split(lc.minibatch_size):   # same order on every rank
                idx = full.tensor_split(self.world_size)[self.rank]
                weight = shard_weight(batch.rollout.completion_mask[idx], batch.rollout.completion_mask[full],
                                      self.cfg.algorithm.loss_agg)
                stats = self._minibatch(batch, idx, weight)
                for k, v in stats.items():      # weighted: summed over ranks they are the minibatch's values
                    sums[k] = sums.get(k, 0.0) + weight * v
                count += 1
        self.version += 1
        if self.world_size > 1:
            names = sorted(sums)
            totals = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.device)
            self.group(DP_GROUP).all_reduce_sum_(totals)
            sums = dict(zip(names, totals.cpu().tolist()))
        metrics = {k: v / count for k, v in sums.items()}
        metrics["optim/lr"] = lr
        return metrics

    def _minibatch(self, batch: TrainBatch, idx: torch.Tensor, weight: float = 1.0) -> dict[str, float]:
        """One optimizer step on this rank's rows `idx` of a minibatch; `weight` is their share of it."""
        a, lc = self.cfg.algorithm, self.cfg.learner
        if len(idx) == 0:
            return self._empty_minibatch()
        d = self.device
        r = batch.rollout
        mask = r.completion_mask[idx].to(d)
        out = self._forward(r, idx, want_entropy=True, want_hidden=self.value_head is not None)
        logprobs = out["logprobs"].float()
        pg_loss, pg = clipped_policy_loss(logprobs, r.logprobs[idx].to(d), batch.advantages[idx].to(d), mask,
                                          a.clip_range, clip_range_high=a.clip_range_high, dual_clip=a.dual_clip,
                                          agg=a.loss_agg)
        entropy = aggregate_loss(out["entropy"].float(), mask, a.loss_agg)
        loss = pg_loss - a.entropy_coef * entropy
        stats = {"policy/loss": pg_loss.item(), "policy/entropy": entropy.item(),
                 "policy/clip_frac": pg["clip_frac"], "policy/approx_kl": pg["approx_kl"]}
        if batch.ref_logprobs is not None:
            kl_tok = kl_penalty(logprobs, batch.ref_logprobs[idx].to(d), a.kl_estimator)
            kl = aggregate_loss(kl_tok, mask, a.loss_agg)
            stats["policy/kl"] = kl.item()
            if not a.kl_in_reward:
                loss = loss + a.kl_coef * kl
        if self.value_head is not None:
            v = self.value_head(out["hidden"]).squeeze(-1).float()
            v_loss, vs = clipped_value_loss(v, batch.values[idx].to(d), batch.returns[idx].to(d), mask,
                                            a.value_clip, agg=a.loss_agg)
            loss = loss + a.value_coef * v_loss
            stats.update({"value/loss": v_loss.item(), "value/clip_frac": vs["value_clip_frac"]})
        self.opt.zero_grad(set_to_none=True)
        (weight * loss).backward()
        self._reduce_grads(self.params)
        stats["optim/grad_norm"] = _clip(self.params, lc.max_grad_norm)
        self.opt.step()
        if self.critic is not None:
            v = self._critic_values(r, idx).float()
            v_loss, vs = clipped_value_loss(v, batch.values[idx].to(d), batch.returns[idx].to(d), mask,
                                            a.value_clip, agg=a.loss_agg)
            self.critic_opt.zero_grad(set_to_none=True)
            (weight * v_loss).backward()
            self._reduce_grads(list(self.critic.parameters()))
            stats["value/grad_norm"] = _clip(list(self.critic.parameters()), lc.max_grad_norm)
            self.critic_opt.step()
            stats.update({"value/loss": v_loss.item(), "value/clip_frac": vs["value_clip_frac"],
                          "value/mean": masked_mean(v.detach(), mask).item()})
        return stats

    def _empty_minibatch(self) -> dict[str, float]:
        """A short last minibatch left this rank no rows: it still takes part in the peers' all-reduces."""
        for params, opt in [(self.params, self.opt)] + ([(list(self.critic.parameters()), self.critic_opt)]
                                                      if self.critic is not None else []):
            opt.zero_grad(set_to_none=True)
            self._reduce_grads(params)
            _clip(params, self.cfg.learner.max_grad_norm)
            opt.step()
        return {}

    def _reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size > 1:
            all_reduce_grads(self.group(DP_GROUP), params)

    # ------------------------------------------------------------------------------------------ weights
    def export_weights(self) -> WeightsPacket:
        return pack_weights(self.policy, self.version)

    def weights_spec(self) -> list[tuple[str, tuple, str]]:
        return weights_spec(self.policy)

    def broadcast_weights(self) -> dict:
        """Send the policy to the generators over the "weights" group (rank 0 of it). -> version, checksum,
        bytes, seconds spent checksumming and sending."""
        import time

        start = time.perf_counter()
        checksum = model_checksum(self.policy)
        sent = send_weights(self.group(SYNC_GROUP), self.policy, self.version, checksum)
        return {"version": self.version, "checksum": checksum, "bytes": sent,
                "seconds": time.perf_counter() - start}

    def checksum(self) -> str:
        return model_checksum(self.policy)

    def state(self) -> tuple[dict, dict]:
        """(models, optimizers) state dicts for a checkpoint."""
        models = {"policy": self.policy.state_dict()}
        optimizers = {"policy": self.opt.state_dict()}
        if self.value_head is not None:
            models["value_head"] = self.value_head.state_dict()
        if self.critic is not None:
            models["critic"] = self.critic.state_dict()
            optimizers["critic"] = self.critic_opt.state_dict()
        return models, optimizers

    def load_state(self, models: dict, optimizers: dict, version: int) -> None:
        self.policy.load_state_dict(models["policy"])
        self.opt.load_state_dict(optimizers["policy"])
        if self.value_head is not None:
            self.value_head.load_state_dict(models["value_head"])
        if self.critic is not None:
            self.critic.load_state_dict(models["critic"])
            self.critic_opt.load_state_dict(optimizers["critic"])
        self.version = version

    def hf_files(self) -> dict[str, bytes]:
        """The policy as a Hugging Face folder's files, to be written where the driver runs."""
        import tempfile

        from pipeline.checkpoint import save_hf_model
        from pipeline.models import load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_hf_model(self.policy, load_tokenizer(self.cfg.model.path), os.path.join(tmp, "model"))
            return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
                    for root, _, names in os.walk(folder) for f in names}


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)
