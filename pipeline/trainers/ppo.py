"""The PPO-family learner: the policy objective (clipped surrogate, KL to the reference, entropy bonus) and
the critic's value loss, on one step's scored batch. Models, optimizers, precision, micro-batches, the
data-parallel reduction and weight export are the engines' (`pipeline.trainers.engine.TrainEngine`, one for the
policy and, for `model.critic=separate`, one for the critic); this class keeps only the objective.

Runs without Ray; `actors.shells.Learner` is its remote shell. The losses come from
`pipeline.algorithms.core`.

Data parallel: K learners (ranks) each hold the whole batch and walk the same minibatch order; each takes
its slice of every minibatch, splits it into micro-batches (`learner.micro_batch_tokens`) and weighs each
micro-batch's loss by its share of the whole minibatch (`shard_weight`). The engines sum the gradients over
the "learners" group before clipping and stepping, so K ranks take exactly the step one learner takes on
the whole minibatch in one pass, and stay identical. With learner.parallel=shard the engines shard the
models over that group (FSDP2) once the learner joins it, and the learners hold the frozen reference
(kl_coef > 0) sharded the same way instead of a reference actor's whole copy. Then every verb is
collective: rollout forwards split the rows over the ranks (the caller concatenates), and exports,
checkpoints and the final model are gathered to rank 0, whose answer is the one to keep (the other ranks
answer None or empty state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch

from pipeline.algorithms.advantages import ADVANTAGE_ESTIMATORS
from pipeline.algorithms.core import (aggregate_loss, clipped_policy_loss, clipped_value_loss, kl_penalty,
                                      masked_mean, shard_weight, truncated_importance_weights)
from pipeline.batch import Rollout, TrainBatch
from pipeline.collective import DP_GROUP, SYNC_GROUP, GroupMember, send_weights
from pipeline.config import RunConfig, learner_reference, learners_sharded, old_logprobs_from_update
from pipeline.trainers.engine import TrainEngine, held_parameters, lr_factor, shard_model
from pipeline.models import (ValueModel, completion_forward, left_padded_positions, load_causal_lm,
                             new_value_head, pad_columns, used_sequence, values_from_hidden)
from pipeline.rollout.reference import load_reference_model
from pipeline.torch_env import derive_seed, resolve_device, setup_torch
from pipeline.weights import WeightsPacket, pack_weights, state_checksum


def real_tokens(r: Rollout) -> torch.Tensor:
    """(N, 2) real prompt and completion tokens of each row: what micro-batches pack by (`micro_batches`)."""
    return torch.stack([r.prompt_mask.sum(1), r.completion_mask.sum(1)], dim=1).long()


class PolicyLearner(GroupMember):
    def __init__(self, cfg: RunConfig, threads: int = 1, rank: int = 0, world_size: int = 1):
        setup_torch(threads, cfg.train.seed)   # same seed on every rank: identical initial value heads
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = resolve_device(cfg.model.device)
        self.version = 0
        m, lc = cfg.model, cfg.learner
        needs_critic = ADVANTAGE_ESTIMATORS.meta(cfg.algorithm.name).get("needs_critic", False)
        policy = load_causal_lm(m.path, dtype="float32", device=self.device, disable_dropout=m.disable_dropout)
        extra = {}
        if needs_critic and m.critic == "shared":
            # A value head on the policy trunk, trained through the policy optimizer (value_coef weighs it).
            extra["value_head"] = new_value_head(policy.config.get_text_config().hidden_size)
        self.policy = self._engine(policy, lc.lr, extra, lora=dataclasses.asdict(cfg.lora) if cfg.lora.rank else None)
        self.value_head = self.policy.extra_modules.get("value_head")
        self.critic = None
        if needs_critic and m.critic == "separate":
            critic = ValueModel(m.critic_path or m.path, disable_dropout=m.disable_dropout)
            self.critic = self._engine(critic, lc.critic_lr)
        # Sharded learners hold the frozen reference too, sharded like the policy (a LoRA policy's is its base).
        self.reference_model = (load_reference_model(m, self.device)
                                if learner_reference(cfg) and not cfg.lora.rank else None)
        self.norm = float(cfg.rollout.max_new_tokens)   # Dr.GRPO's constant: the generation budget

    def _engine(self, model, lr: float, extra=None, lora=None) -> TrainEngine:
        return TrainEngine(model, lr=lr, device=self.device, extra_modules=extra, group=lambda: self.group(DP_GROUP),
                           lora=lora, **self.cfg.learner.engine_options(self.cfg.model.dtype))

    def join_group(self, name: str, host: str, port: int, rank: int, size: int, backend: str = "gloo",
                   timeout_s: float = 60.0, world: bool = False) -> None:
        """As GroupMember's; joining the learners' group of a sharded run also shards the engines over it."""
        shard = name == DP_GROUP and learners_sharded(self.cfg)
        super().join_group(name, host, port, rank, size, backend, timeout_s, world=world or shard)
        if shard:
            mesh = self.group(DP_GROUP).mesh(torch.device(self.device).type)
            for engine in (self.policy, self.critic):
                if engine is not None:
                    engine.shard(mesh, cpu_offload=self.cfg.learner.cpu_offload)
            if self.reference_model is not None:     # frozen: gathered in its own dtype, no gradients to reduce
                shard_model(self.reference_model, mesh, cpu_offload=self.cfg.learner.cpu_offload)

    def held_parameters(self) -> dict[str, tuple[int, int]]:
        """{engine or "reference": (parameters this rank holds, of the whole model)}."""
        held = {name: e.held_parameters() for name, e in (("policy", self.policy), ("critic", self.critic)) if e}
        if self.reference_model is not None:
            held["reference"] = held_parameters(self.reference_model)
        return held

    @property
    def sharded(self) -> bool:
        return self.policy.sharded

    # ------------------------------------------------------------------------------------------ forwards
    def _forward(self, r: Rollout, rows: torch.Tensor, model=None, **want) -> dict:
        d = self.device
        return completion_forward(model or self.policy.model, r.prompt_ids[rows].to(d), r.prompt_mask[rows].to(d),
                                  r.completion_ids[rows].to(d), r.completion_mask[rows].to(d),
                                  temperature=self.cfg.rollout.temperature, **want)

    def _critic_values(self, r: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """(n, T) value of the state before each completion token, from the separate critic."""
        ids, mask, P, T = used_sequence(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                                        r.completion_mask[rows])             # as completion_forward's pass
        ids, mask = ids.to(self.device), mask.to(self.device)
        values = self.critic.model(ids, mask, left_padded_positions(mask))   # (n, P+T)
        return pad_columns(values[:, P - 1:P + T - 1], r.completion_ids.shape[1])   # each token's predictor

    def _reference(self):
        """The context of a log pi_ref forward: none for the frozen reference model the sharded learners hold
        (it computes in its own dtype); a LoRA policy's base, adapters off, otherwise."""
        if self.reference_model is not None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.policy.reference())
        stack.enter_context(self.policy.autocast())
        return stack

    @torch.no_grad()
    def rollout_forward(self, r: Rollout, old_logprobs: bool = False, ref_logprobs: bool = False) -> dict:
        """What the learner knows of a fresh rollout, before any update: {"values": (N, T) rollout-time critic
        values or None when the estimator needs no critic, "old_logprobs": (N, T) log pi_old from this
        learner's own forward, or None unless asked, "ref_logprobs": (N, T) log pi_ref from the frozen
        reference the sharded learners hold, or from a LoRA policy's base (adapters off); None unless asked}.
        Micro-batched like the update.
        Sharded: every rank computes its consecutive slice of the rows (concatenated in rank order, they are
        the whole); a rank's padding passes compute row 0 and drop it."""
        need_policy = old_logprobs or self.value_head is not None
        values, logprobs, ref = [], [], []
        length = r.prompt_ids.shape[1] + r.completion_ids.shape[1]
        every = torch.arange(len(r.prompts))
        mine = every.tensor_split(self.world_size)[self.rank] if self.sharded else every
        order = []                       # the rows of each kept chunk: chunks go longest first
        for rows in self.policy.micro_batches(mine, length, most=-(-len(every) // self.world_size),
                                              spans=real_tokens(r)):
            keep = len(rows) > 0
            order += [rows] if keep else []
            rows = rows if keep else every[:1]
            if need_policy:
                with self.policy.autocast():
                    out = self._forward(r, rows, want_hidden=self.value_head is not None)
                if keep:
                    logprobs.append(out["logprobs"].float().cpu())
                if self.value_head is not None:
                    v = values_from_hidden(self.value_head, out["hidden"]).cpu()
                    values += [v] if keep else []
            if ref_logprobs:
                with self._reference():
                    lp = self._forward(r, rows, self.reference_model)["logprobs"].float().cpu()
                ref += [lp] if keep else []
            if self.critic is not None:
                with self.critic.autocast():
                    v = self._critic_values(r, rows).float().cpu()
                values += [v] if keep else []
        T = r.completion_ids.shape[1]
        none = torch.zeros(0, T)         # a sharded rank with no rows of its own
        back = torch.argsort(torch.cat(order)) if order else None    # to this rank's row order

        def rows_in_order(parts):
            return torch.cat(parts)[back] if parts else none

        wants_values = self.value_head is not None or self.critic is not None
        return {"values": rows_in_order(values) if wants_values else None,
                "old_logprobs": rows_in_order(logprobs) if old_logprobs else None,
                "ref_logprobs": rows_in_order(ref) if ref_logprobs else None}

    # ------------------------------------------------------------------------------------------ update
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Epochs x minibatches of clipped policy (and value) updates. Returns mean metrics."""
        lc, r = self.cfg.learner, batch.rollout
        bound = self.cfg.rollout.max_staleness
        if not 0 <= self.version - r.policy_version <= bound:
            raise RuntimeError(f"rollout from policy version {r.policy_version}, learner is at {self.version}: more "
                               f"than rollout.max_staleness={bound} versions apart means weights were not synced")
        lr = lc.lr * lr_factor(self.version, lc.warmup_steps)
        self.policy.set_lr(lr)
        n, mask = batch.num_sequences, r.train_mask
        if batch.pi_old == "update" and not old_logprobs_from_update(self.cfg, n):
            raise RuntimeError(f"pi_old from the update's own forward needs one optimizer step over the batch; "
                               f"learner.epochs={lc.epochs}, minibatch_size={lc.minibatch_size}, {n} rows")
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, self.version))
        # Every rank reports the same names (it takes part in the sum below even with no rows of its own).
        sums = {k: 0.0 for k in self._stat_names(batch)}
        minibatches, spans = 0, real_tokens(r)       # what micro-batches pack by, once per update
        for _ in range(lc.epochs):
            for full in torch.randperm(n, generator=gen).split(lc.minibatch_size):   # same order on every rank
                for k, v in self._minibatch(batch, full, spans).items():
                    sums[k] += v
                minibatches += 1
        self.version += 1
        if self.world_size > 1:         # each rank's figures are weighted by its share: their sum is the whole's
            names = sorted(sums)
            totals = torch.tensor([sums[k] for k in names], dtype=torch.float64, device=self.device)
            self.group(DP_GROUP).all_reduce_sum_(totals)
            sums = dict(zip(names, totals.cpu().tolist()))
        metrics = {k: v / max(minibatches, 1) for k, v in sums.items()}
        metrics["optim/lr"] = lr
        metrics["optim/skipped_steps"] = float(self.policy.skipped_steps)
        return metrics

    def _stat_names(self, batch: TrainBatch) -> list[str]:
        names = ["policy/loss", "policy/entropy", "policy/clip_frac", "policy/approx_kl", "optim/grad_norm"]
        if batch.ref_logprobs is not None:
            names.append("policy/kl")
        if self.cfg.algorithm.tis_cap:
            names += ["policy/tis_weight_mean", "policy/tis_truncated_frac"]
        if batch.pi_old == "update":
            names.append("policy/sampler_logprob_gap")
        if self.value_head is not None or self.critic is not None:
            names += ["value/loss", "value/clip_frac"]
        if self.critic is not None:
            names += ["value/grad_norm", "value/mean"]
        return names

    def _minibatch(self, batch: TrainBatch, full: torch.Tensor, spans: torch.Tensor) -> dict[str, float]:
        """One optimizer step (per engine) on this rank's share of the minibatch `full` (row indices).
        Figures come weighted by this rank's share of the minibatch."""
        r, agg = batch.rollout, self.cfg.algorithm.loss_agg
        rows, full_mask = full.tensor_split(self.world_size)[self.rank], r.train_mask[full]
        length, most = r.prompt_ids.shape[1] + r.completion_ids.shape[1], -(-len(full) // self.world_size)
        share = shard_weight(r.train_mask[rows], full_mask, agg) if len(rows) else 0.0

        def weight(part):               # the micro-batch's share of the whole minibatch's loss
            return shard_weight(r.train_mask[part], full_mask, agg)

        # A sharded rank's padding pass runs on any row (full[:1]) with weight 0; an empty rank still steps.
        stats, step = self.policy.train_step(rows, length, lambda part: self._policy_loss(batch, part), weight,
                                             most=most, stand_in=full[:1], spans=spans)
        stats["optim/grad_norm"] = share * step["grad_norm"]
        if self.critic is not None:
            figures, step = self.critic.train_step(rows, length, lambda part: self._value_loss(batch, part), weight,
                                                   most=most, stand_in=full[:1], spans=spans)
            stats.update(figures, **{"value/grad_norm": share * step["grad_norm"]})
        return stats

    def _policy_loss(self, batch: TrainBatch, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy objective on `rows` (a micro-batch; the engine runs it under autocast and takes the
        backward) and its figures. The entropy term enters the graph only with a coefficient: 0 * NaN would
        still be NaN, and its (n, T, V) softmax would be kept for the backward pass for nothing."""
        a, d, r = self.cfg.algorithm, self.device, batch.rollout
        mask, sampler = r.train_mask[rows].to(d), r.logprobs[rows].to(d)
        out = self._forward(r, rows, want_entropy=True, entropy_grad=a.entropy_coef > 0,
                            want_hidden=self.value_head is not None)
        logprobs = out["logprobs"]
        if batch.pi_old == "update":    # the parameters of this one step are pi_old's: its own forward, detached
            old = logprobs.detach().float()
        else:                           # the learner pass's, or the sampler's
            old = batch.pi_old_logprobs[rows].to(d)
        tis = truncated_importance_weights(old, sampler, a.tis_cap) if a.tis_cap else None
        pg_loss, pg = clipped_policy_loss(logprobs, old, batch.advantages[rows].to(d), mask, a.clip_range,
                                          clip_range_high=a.clip_range_high, dual_clip=a.dual_clip,
                                          agg=a.loss_agg, norm=self.norm, token_weights=tis)
        entropy = aggregate_loss(out["entropy"], mask, a.loss_agg, self.norm)
        loss = pg_loss - a.entropy_coef * entropy if a.entropy_coef > 0 else pg_loss
        stats = {"policy/loss": pg_loss.item(), "policy/entropy": entropy.item(),
                 "policy/clip_frac": pg["clip_frac"], "policy/approx_kl": pg["approx_kl"]}
        if batch.pi_old == "update":
            stats["policy/sampler_logprob_gap"] = masked_mean((old - sampler).abs(), mask).item()
        if tis is not None:
            stats["policy/tis_weight_mean"] = masked_mean(tis, mask).item()
            stats["policy/tis_truncated_frac"] = masked_mean((tis >= a.tis_cap).float(), mask).item()
        if batch.ref_logprobs is not None:
            kl = aggregate_loss(kl_penalty(logprobs, batch.ref_logprobs[rows].to(d), a.kl_estimator), mask,
                                a.loss_agg, self.norm)
            stats["policy/kl"] = kl.item()
            if not a.kl_in_reward:
                loss = loss + a.kl_coef * kl
        if self.value_head is not None:
            v = values_from_hidden(self.value_head, out["hidden"])
            v_loss, vs = clipped_value_loss(v, batch.values[rows].to(d), batch.returns[rows].to(d), mask,
                                            a.value_clip, agg=a.loss_agg, norm=self.norm)
            loss = loss + a.value_coef * v_loss
            stats.update({"value/loss": v_loss.item(), "value/clip_frac": vs["value_clip_frac"]})
        return loss, stats

    def _value_loss(self, batch: TrainBatch, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The separate critic's clipped value loss on `rows`, and its figures."""
        a, d, r = self.cfg.algorithm, self.device, batch.rollout
        mask = r.train_mask[rows].to(d)
        v = self._critic_values(r, rows).float()
        v_loss, vs = clipped_value_loss(v, batch.values[rows].to(d), batch.returns[rows].to(d), mask,
                                        a.value_clip, agg=a.loss_agg, norm=self.norm)
        return v_loss, {"value/loss": v_loss.item(), "value/clip_frac": vs["value_clip_frac"],
                        "value/mean": masked_mean(v.detach(), mask).item()}

    # ------------------------------------------------------------------------------------------ weights
    def _generator_state(self) -> dict[str, torch.Tensor] | None:
        """The policy as the generators hold it: cast to model.dtype (what the checksum is computed on).
        Sharded: gathered by every rank, kept by rank 0; None on the others."""
        return self.policy.export_state(self.cfg.model.dtype)

    def export_weights(self) -> WeightsPacket | None:
        state = self._generator_state()
        return None if state is None else pack_weights(state, self.version)

    def weights_spec(self) -> list[tuple[str, tuple, str]]:
        return self.policy.export_spec(self.cfg.model.dtype)

    def broadcast_weights(self) -> dict | None:
        """Send the policy to the generators over the "weights" group (rank 0 of it). -> version, checksum,
        bytes, seconds spent gathering, casting, checksumming and sending. Sharded: every rank calls it (to
        gather); the others return None."""
        start = time.perf_counter()
        state = self._generator_state()
        if state is None:
            return None
        checksum = state_checksum(state)
        sent = send_weights(self.group(SYNC_GROUP), state, self.version, checksum)
        return {"version": self.version, "checksum": checksum, "bytes": sent,
                "seconds": time.perf_counter() - start}

    def checksum(self) -> str | None:
        state = self._generator_state()
        return None if state is None else state_checksum(state)

    def state(self) -> tuple[dict, dict]:
        """(models, optimizers) state dicts for a checkpoint."""
        models, optimizers = self.policy.state("policy")
        if self.critic is not None:
            critic_models, critic_optimizers = self.critic.state("critic")
            models.update(critic_models)
            optimizers.update(critic_optimizers)
        return models, optimizers

    def load_state(self, models: dict, optimizers: dict, version: int) -> None:
        self.policy.load_state("policy", models, optimizers)
        if self.critic is not None:
            self.critic.load_state("critic", models, optimizers)
        self.version = version

    def hf_files(self) -> dict[str, bytes] | None:
        """The policy as a Hugging Face folder's files (weights in model.dtype), to be written where the
        driver runs. Sharded: every rank calls it (to gather); the others return None."""
        import tempfile

        from pipeline.checkpoint import read_folder
        from pipeline.models import load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.policy.save_hf(os.path.join(tmp, "model"), load_tokenizer(self.cfg.model.path))
            return None if folder is None else read_folder(folder)
