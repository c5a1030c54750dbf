"""The training engine: one model trained by one optimizer, the part every trainer shares (PPO's policy and
critic, supervised fine-tuning, and reward models next). A trainer brings only its objective: it computes a
loss on the rows it is given and hands it to `backward`; the engine does the rest.

What it owns, so that no trainer has to get it right again:
- **Precision.** The weights the optimizer steps on are float32 (master weights) and forward/backward run
  under autocast to the compute dtype (`bfloat16`, `float16`, or plain `float32`). Stepping AdamW on bf16
  weights loses most updates at the learning rates RL uses: a bf16 weight of ~0.02 moves in steps of
  ~1.2e-4, so an update of 1e-6..1e-5 rounds back to the old value. float16 adds a dynamic loss scaler.
  Generators and the reference hold their own copy in the compute dtype: `export_state` casts for them.
- **Micro-batches.** `micro_batches` splits rows so that rows x padded length stays within a token
  budget; the trainer weighs each micro-batch's loss by its share of the whole minibatch (`shard_weight`),
  so accumulated gradients equal one pass over the minibatch.
- **Gradient checkpointing** (HF's, non-reentrant): activations recomputed in backward.
- **Data parallel.** Gradients are summed over the learners' process group before clipping, so K learners
  take the step one learner would take (`pipeline.collective.all_reduce_grads`).
- **A guarded step.** A non-finite gradient norm (one -inf logit, an overflow) skips the optimizer step and
  is counted; the weights never take a NaN. Every rank sees the same reduced norm, so all skip together.
- **State and export**: optimizer and weights for checkpoints, the weights cast for the generators, a
  Hugging Face folder.
- **LoRA** (`lora`, through peft, `pipeline.lora`): only the adapters train, sit in the optimizer and in
  `state`; `export_state` and `save_hf` give the merged weights under the base model's names, so a
  generator or `from_pretrained` never sees an adapter; `reference()` computes the base without adapters.
Sharding (FSDP2) belongs here too, as an engine option: a trainer never touches parameters, gradients or
the optimizer directly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.collective import Group, all_reduce_grads
from pipeline.lora import adapter_state, apply_lora, load_adapter_state, merged_copy, merged_state
from pipeline.models import DTYPES, enable_activation_checkpointing


def lr_factor(step: int, warmup_steps: int, decay_steps: Optional[int] = None, floor: float = 0.1) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warm-up over `warmup_steps`, then constant
    (decay_steps None) or a cosine decay to `floor` of the peak at `decay_steps`, held there afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainEngine:
    """One model (plus optional extra modules trained with it, e.g. a value head) and its AdamW optimizer.

    model: an nn.Module (an HF model), moved to `device` and cast to float32 master weights.
    compute_dtype: "float32" | "bfloat16" | "float16": the dtype forward and backward run in (autocast).
    micro_batch_tokens: 0 = a trainer's rows go through in one pass; else the budget `micro_batches` uses.
    group: returns the data-parallel process group (or None): looked up at each step, because learners
    join their group after they are built.
    lora: None, or {rank, alpha, dropout, target_modules}: train adapters on the frozen model instead.
    """

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 compute_dtype: str = "float32", device: str = "cpu", gradient_checkpointing: bool = False,
                 micro_batch_tokens: int = 0, extra_modules: Optional[dict[str, nn.Module]] = None,
                 group: Callable[[], Optional[Group]] = lambda: None, lora: Optional[dict] = None):
        if compute_dtype not in DTYPES:
            raise ValueError(f"unknown compute dtype {compute_dtype!r}; valid: {', '.join(DTYPES)}")
        self.device = torch.device(device)
        self.compute_dtype = DTYPES[compute_dtype]
        self.model = model.to(device=self.device, dtype=torch.float32)
        self.extra_modules = {name: m.to(device=self.device, dtype=torch.float32)
                              for name, m in (extra_modules or {}).items()}
        self.max_grad_norm = max_grad_norm
        self.micro_batch_tokens = micro_batch_tokens
        self.group = group
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.lora = bool(lora)
        if self.lora:
            self.model = apply_lora(self.model, **lora)
        self.model.train()            # dropout is zeroed at load; train mode keeps gradient checkpointing on
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for m in self.extra_modules.values():
            self.params += [p for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        # float16's 5 exponent bits underflow small gradients: scale the loss up, unscale before clipping.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        self.skipped_steps = 0

    # ------------------------------------------------------------------------------------ a step
    def autocast(self):
        """The context every forward of a trainer runs in (nothing to do in float32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro_batches(self, rows: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Split `rows` (1-D) of sequences padded to `length` tokens into consecutive chunks of at most
        micro_batch_tokens // length rows (at least one); one chunk when there is no budget."""
        if len(rows) == 0:
            return []
        if not self.micro_batch_tokens:
            return [rows]
        per_chunk = max(1, self.micro_batch_tokens // max(1, length))
        return list(rows.split(per_chunk))

    def backward(self, loss: torch.Tensor, weight: float = 1.0) -> None:
        """Accumulate the gradient of weight * loss (weight: this micro-batch's share of the minibatch)."""
        loss = loss * weight
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> dict[str, float]:
        """Reduce gradients over the data-parallel group, clip, and step unless the norm is not finite.
        Ranks with no rows still call it: it takes part in the all-reduce. -> {"grad_norm", "skipped"}."""
        group = self.group()
        if group is not None and group.size > 1:
            all_reduce_grads(group, self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0
                                                    else math.inf))
        skipped = not math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)      # skips by itself on inf/NaN gradients
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if skipped:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped": float(skipped)}

    # ------------------------------------------------------------------------------------ state
    def modules(self, name: str) -> dict[str, nn.Module]:
        """The engine's modules by checkpoint name: `name` for the model, the extra modules by theirs."""
        return {name: self.model, **self.extra_modules}

    def state(self, name: str) -> tuple[dict, dict]:
        """({module name: state dict}, {optimizer name: state}) for a checkpoint under `name`. With LoRA the
        model's entry holds the adapters only: the base is the model folder the run started from."""
        models = {k: m.state_dict() for k, m in self.modules(name).items()}
        if self.lora:
            models[name] = adapter_state(self.model)
        optimizers = {name: self.optimizer.state_dict()}
        if self.scaler is not None:
            optimizers[f"{name}_scaler"] = self.scaler.state_dict()
        return models, optimizers

    def load_state(self, name: str, models: dict, optimizers: dict) -> None:
        for k, m in self.modules(name).items():
            if self.lora and k == name:
                load_adapter_state(m, models[k])
            else:
                m.load_state_dict(models[k])
        self.optimizer.load_state_dict(optimizers[name])
        if self.scaler is not None and f"{name}_scaler" in optimizers:
            self.scaler.load_state_dict(optimizers[f"{name}_scaler"])

    def export_state(self, dtype: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The model's weights as the generators hold them: detached, cast to `dtype` (default: the
        compute dtype). Tied weights appear under each of their names, as in `state_dict`."""
        target = DTYPES[dtype] if dtype else self.compute_dtype
        state = merged_state(self.model) if self.lora else self.model.state_dict()
        return {k: v.detach().to(target) for k, v in state.items()}

    def reference(self):
        """Context in which a LoRA model computes its frozen base (adapters off): a LoRA run's reference
        policy. Without adapters there is no base to switch to: the run keeps a reference model of its own."""
        if not self.lora:
            raise RuntimeError("TrainEngine.reference(): only a LoRA engine holds its reference (lora.rank > 0)")
        return self.model.disable_adapter()     # peft's context manager

    def save_hf(self, out_dir: str, tokenizer=None, dtype: Optional[str] = None) -> str:
        """The model as a Hugging Face folder (weights in `dtype`, default the compute dtype), atomically."""
        import copy

        from pipeline.checkpoint import save_hf_model

        target = DTYPES[dtype] if dtype else self.compute_dtype
        if self.lora:
            model = merged_copy(self.model).to(target)         # a copy already: cast in place
        else:
            model = self.model if target == torch.float32 else copy.deepcopy(self.model).to(target)
        return save_hf_model(model, tokenizer, out_dir)
