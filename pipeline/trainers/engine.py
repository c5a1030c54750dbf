"""The training engine: one model trained by one optimizer, the part every trainer shares (PPO's policy and
critic, supervised fine-tuning, and reward models next). A trainer brings only its objective: it computes a
loss on the rows it is given and hands it to `backward`; the engine does the rest.

What it owns, so that no trainer has to get it right again:
- **Precision.** The weights the optimizer steps on are float32 (master weights) and forward/backward run
  under autocast to the compute dtype (`bfloat16`, `float16`, or plain `float32`). Stepping AdamW on bf16
  weights loses most updates at the learning rates RL uses: a bf16 weight of ~0.02 moves in steps of
  ~1.2e-4, so an update of 1e-6..1e-5 rounds back to the old value. float16 adds a dynamic loss scaler.
  Generators and the reference hold their own copy in the compute dtype: `export_state` casts for them.
- **One step for every trainer** (`train_step`): set the lr, micro-batches, autocast, backward, step; the
  trainer passes its loss and each micro-batch's weight.
- **Micro-batches.** `micro_batches` splits rows so that rows x length stays within a token budget: the
  padded length, or, given each row's real tokens, the width its chunk keeps once the forward drops the
  columns no row of it uses (rows go longest first, so compute follows real tokens); the trainer weighs
  each micro-batch's loss by its share of the whole minibatch (`shard_weight`), so accumulated gradients
  equal one pass over the minibatch.
- **Gradient checkpointing** (HF's, non-reentrant): activations recomputed in backward.
- **Data parallel.** Gradients are summed over the learners' process group before clipping, so K learners
  take the step one learner would take (`pipeline.collective.all_reduce_grads`).
- **A guarded step.** A non-finite gradient norm (one -inf logit, an overflow) skips the optimizer step and
  is counted; the weights never take a NaN. Every rank sees the same reduced norm, so all skip together.
- **State and export**: optimizer and weights for checkpoints, the weights cast for the generators, a
  Hugging Face folder.
- **LoRA** (`lora`, through peft, `pipeline.trainers.lora`): only the adapters train, sit in the optimizer and in
  `state`; `export_state` and `save_hf` give the merged weights under the base model's names, so a
  generator or `from_pretrained` never sees an adapter; `reference()` computes the base without adapters.
- **Sharding** (`shard`, FSDP2's `fully_shard` over the learners' process group): each of K learners holds
  1/K of the weights, gradients and AdamW moments; every transformer block is gathered for its forward and
  backward and freed after, and gradients are reduce-scattered (summed, as the replicated all-reduce does).
  Every rank must then run the same passes: `micro_batches` pads a rank's list with empty chunks, which the
  trainer runs on a stand-in row with weight 0. Checkpoints hold the gathered (full) state keyed by name, so
  a run resumes on any number of learners, sharded or not; export gathers one tensor at a time to rank 0
  (the only one that keeps them).
A trainer never touches parameters, gradients or the optimizer directly.
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.collective import Group, all_reduce_grads
from pipeline.trainers.lora import (adapter_state, apply_lora, load_adapter_state, load_merged_state, merged_copy,
                                   merged_state)
from pipeline.models import DTYPES, enable_activation_checkpointing, transformer_blocks


def lr_factor(step: int, warmup_steps: int, decay_steps: Optional[int] = None, floor: float = 0.1) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warm-up over `warmup_steps`, then constant
    (decay_steps None) or a cosine decay to `floor` of the peak at `decay_steps`, held there afterwards."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def shard_model(model: nn.Module, mesh, mp=None, cpu_offload: bool = False, *extra: nn.Module) -> list[nn.Module]:
    """FSDP2 (`fully_shard`) on `model` over `mesh`: each transformer block one unit, each value head (a module
    marked `keep_float32`) one unit gathered in float32, then the root (the rest: embeddings, final norm,
    head), then each extra module. mp: a MixedPrecisionPolicy or None (parameters compute in their own
    dtype); cpu_offload: shards live in host memory (CPUOffloadPolicy). -> the units. Frees the unsharded
    weights before returning.

    A value head regresses returns in float32 (`values_from_hidden` feeds it float32 hidden states): under
    the bf16 policy it would be gathered in bf16, and fail on the dtype mismatch (or, as the shared critic's
    input is cast, give bf16 values)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    kw = {"mesh": mesh, "mp_policy": mp or MixedPrecisionPolicy(), "offload_policy": offload}
    float32 = {**kw, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                                       cast_forward_inputs=False)}
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    for head in [m for top in (model, *extra) for m in top.modules() if getattr(m, "keep_float32", False)]:
        fully_shard(head, **float32)
    for top in (model, *extra):
        if not isinstance(top, FSDPModule):          # an extra module that is itself a value head: done
            fully_shard(top, **kw)
    gc.collect()                                 # the whole unsharded weights go now, not at some later sweep
    return [m for top in (model, *extra) for m in top.modules() if isinstance(m, FSDPModule)]


def pack_by_width(rows: torch.Tensor, spans: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """`rows`, longest first (prompt + completion tokens in `spans`, (N, 2) by row id), in chunks that each take
    rows while len(chunk) x (longest prompt + longest completion in it) <= budget (at least one row)."""
    order = rows[torch.argsort(spans[rows].sum(1), descending=True, stable=True)]
    chunks, start, widest_p, widest_t = [], 0, 0, 0
    for i, row in enumerate(order.tolist()):
        p, t = max(widest_p, int(spans[row, 0])), max(widest_t, int(spans[row, 1]))
        if i > start and (i - start + 1) * (p + t) > budget:
            chunks.append(order[start:i])
            start, p, t = i, int(spans[row, 0]), int(spans[row, 1])
        widest_p, widest_t = p, t
    chunks.append(order[start:])
    return chunks


def held_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters of `module` this process holds, parameters of the whole module): equal unless sharded."""
    ps = list(module.parameters())
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in ps), sum(p.numel() for p in ps)


def full_tensor(t):
    """The whole tensor behind `t`: a DTensor shard is gathered from every rank (every rank must call it);
    anything else is returned as is. A shard kept in host memory (CPU offload) is gathered on the mesh's
    device, as NCCL needs."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)
    return t.full_tensor()


class TrainEngine:
    """One model (plus optional extra modules trained with it, e.g. a value head) and its AdamW optimizer.

    model: an nn.Module (an HF model), moved to `device` and cast to float32 master weights.
    compute_dtype: "float32" | "bfloat16" | "float16": the dtype forward and backward run in (autocast).
    micro_batch_tokens: 0 = a trainer's rows go through in one pass; else the budget `micro_batches` uses.
    group: returns the data-parallel process group (or None): looked up at each step, because learners
    join their group after they are built.
    lora: None, or {rank, alpha, dropout, target_modules[, train_in_full]}: train adapters on the frozen model
    instead (`pipeline.trainers.lora.apply_lora`).
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
        self.sharded, self.rank = False, 0
        self._whole = nn.ModuleDict({"model": self.model, **self.extra_modules})   # one tree for state dicts

    # ------------------------------------------------------------------------------------ sharding
    def shard(self, mesh, cpu_offload: bool = False) -> None:
        """FSDP2 over `mesh` (a 1-D DeviceMesh of the data-parallel learners; every rank calls it, before the
        first step): each transformer block is one unit, the rest of the model (embeddings, final norm, head)
        the root's, each extra module its own. Parameters live as float32 shards (the master weights) and are
        gathered in the compute dtype (FSDP2's mixed precision; gradients reduce in float32).
        cpu_offload: the shards, their gradients and so AdamW's moments live in host memory and the
        optimizer steps there (FSDP2's CPUOffloadPolicy); the device holds only the blocks being gathered."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.scaler is not None:
            raise ValueError("sharded learners run in bfloat16 or float32; float16's loss scaler does not "
                             "shard: set model.dtype=bfloat16, or learner.parallel=replicate")
        if self.lora:
            raise ValueError("LoRA adapters train replicated: set learner.parallel=replicate with lora.rank > 0")
        if any(self.optimizer.state.values()):
            raise RuntimeError("TrainEngine.shard() comes before the first step")
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for unit in shard_model(self.model, mesh, mp, cpu_offload, *self.extra_modules.values()):
            unit.set_gradient_divide_factor(1.0)      # sum, not mean: trainers weigh each rank's share
            unit.set_force_sum_reduction_for_comms(True)    # plain SUM (gloo has no PREMUL_SUM)
        self.sharded, self.rank = True, mesh.get_local_rank()
        self.params = [p for top in (self.model, *self.extra_modules.values()) for p in top.parameters()
                       if p.requires_grad]          # fully_shard replaced them with DTensor shards
        self.optimizer = torch.optim.AdamW(self.params, **{k: self.optimizer.defaults[k]
                                                           for k in ("lr", "weight_decay")})

    def held_parameters(self) -> tuple[int, int]:
        """(parameters this process holds, parameters of the whole model): equal unless sharded."""
        return held_parameters(self._whole)

    # ------------------------------------------------------------------------------------ a step
    def autocast(self):
        """The context every forward of a trainer runs in (nothing to do in float32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro_batches(self, rows: torch.Tensor, length: int, most: Optional[int] = None,
                      spans: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Split `rows` (1-D) of sequences padded to `length` tokens into chunks that stay within the
        micro_batch_tokens budget; one chunk when there is no budget.

        spans: None, or (N, 2) real (prompt, completion) tokens of every row (indexed by row id). Without it,
        chunks are consecutive, micro_batch_tokens // length rows each (at least one). With it, compute follows
        real tokens: rows go longest first, and a chunk takes rows while rows x (its longest prompt + its
        longest completion) stays within the budget, the width the forward keeps once it drops the columns
        that hold no chunk row's real token (`pipeline.models.used_columns`). Such a chunk holds at least
        as many rows as a padded one, so no more chunks come out.

        most: the largest number of rows any rank holds in this pass. A sharded engine pads the list with
        empty chunks to the count that many rows would take at the padded length (at least one), so that every
        rank runs as many forwards and backwards as the others: the trainer runs an empty chunk on any row,
        with weight 0."""
        per_chunk = max(1, self.micro_batch_tokens // max(1, length)) if self.micro_batch_tokens else None
        if per_chunk is None or not len(rows):
            chunks = [rows] if len(rows) else []
        elif spans is None:
            chunks = list(rows.split(per_chunk))
        else:
            chunks = pack_by_width(rows, spans, self.micro_batch_tokens)
        if self.sharded and most is not None:
            needed = max(1, -(-most // per_chunk)) if per_chunk else 1
            chunks += [rows[:0]] * (needed - len(chunks))
        return chunks

    def train_step(self, rows: torch.Tensor, length: int, loss_fn: Callable[[torch.Tensor], tuple],
                   weight_fn: Callable[[torch.Tensor], float], *, lr: Optional[float] = None,
                   most: Optional[int] = None, stand_in: Optional[torch.Tensor] = None,
                   spans: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
        """One optimizer step on `rows` (1-D indices of sequences padded to `length` tokens), the sequence every
        trainer takes: set the lr (if given), split into micro-batches, and for each run
        `loss_fn(chunk) -> (loss, figures)` under autocast and accumulate the gradient of
        `weight_fn(chunk) * loss` (the chunk's share of the whole minibatch, so the accumulated gradient is one
        pass over it); then reduce, clip and step (`step`). spans: as `micro_batches`'. A sharded engine's
        padding chunks (see `micro_batches`, `most`) run `loss_fn(stand_in)` with weight 0. A rank with no
        rows still steps: it takes part in the gradient reduction.
        -> (figures summed with their chunk's weight, `step`'s result)."""
        if lr is not None:
            self.set_lr(lr)
        figures: dict[str, float] = {}
        for chunk in self.micro_batches(rows, length, most, spans):
            weight = weight_fn(chunk) if len(chunk) else 0.0
            with self.autocast():
                loss, chunk_figures = loss_fn(chunk if len(chunk) else stand_in)
            self.backward(loss, weight)
            for k, v in chunk_figures.items():
                figures[k] = figures.get(k, 0.0) + weight * v
        return figures, self.step()

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
        if group is not None and group.size > 1 and not self.sharded:   # sharded: reduce-scattered in backward
            all_reduce_grads(group, self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        norm = float(full_tensor(norm))                                 # sharded: a DTensor
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
        """({module name: state dict}, {optimizer name: state}) for a checkpoint under `name`. The optimizer
        state is keyed by parameter name (`torch.distributed.checkpoint.state_dict`'s full state dict), so
        it loads into a replicated or a sharded engine on any number of learners. Sharded, every rank calls
        it (the state is gathered) and rank 0 gets it all, the others ({}, {}). With LoRA the model's entry
        holds the adapters only (the base is the model folder the run started from), and the optimizer's
        state is torch's own (indexed)."""
        if self.lora:
            models = {k: m.state_dict() for k, m in self.modules(name).items()}
            models[name] = adapter_state(self.model)
            optimizers = {name: self.optimizer.state_dict()}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            whole, optim = get_state_dict(self._whole, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank != 0:
                return {}, {}
            models = {k: {} for k in self.modules(name)}
            for key, value in whole.items():
                top, rest = key.split(".", 1)
                models[name if top == "model" else top][rest] = value
            optimizers = {name: optim}
        if self.scaler is not None:
            optimizers[f"{name}_scaler"] = self.scaler.state_dict()
        return models, optimizers

    def load_state(self, name: str, models: dict, optimizers: dict) -> None:
        """Load what `state` gave (every rank gets the full state; a sharded one keeps its shard)."""
        groups = optimizers[name].get("param_groups") or [{"params": []}]
        by_name = any(isinstance(p, str) for g in groups for p in g["params"])
        if self.lora or not by_name:       # LoRA's, or a checkpoint from before name-keyed optimizer state
            if self.sharded:
                raise ValueError(f"checkpoint's {name!r} optimizer state is indexed, not named: resume it with "
                                 "learner.parallel=replicate")
            for k, m in self.modules(name).items():
                if self.lora and k == name:
                    load_adapter_state(m, models[k])
                else:
                    m.load_state_dict(models[k])
            self.optimizer.load_state_dict(optimizers[name])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            whole = {f"{'model' if k == name else k}.{p}": v for k in self.modules(name) for p, v in models[k].items()}
            set_state_dict(self._whole, self.optimizer, model_state_dict=whole, optim_state_dict=optimizers[name],
                           options=StateDictOptions(full_state_dict=True))
        if self.scaler is not None and f"{name}_scaler" in optimizers:
            self.scaler.load_state_dict(optimizers[f"{name}_scaler"])

    def export_spec(self, dtype: Optional[str] = None) -> list[tuple[str, tuple, str]]:
        """(name, shape, dtype) of what `export_state` gives, without gathering anything."""
        target = str(DTYPES[dtype] if dtype else self.compute_dtype).removeprefix("torch.")
        if self.lora:
            return [(k, tuple(v.shape), target) for k, v in merged_state(self.model).items()]
        return [(k, tuple(v.shape), target) for k, v in self.model.state_dict().items()]

    def export_state(self, dtype: Optional[str] = None) -> Optional[dict[str, torch.Tensor]]:
        """The model's weights as the generators hold them: detached, cast to `dtype` (default: the
        compute dtype). Tied weights appear under each of their names, as in `state_dict`. Sharded: every
        rank calls it; tensors are gathered one at a time and only rank 0 keeps them (the others get None)."""
        target = DTYPES[dtype] if dtype else self.compute_dtype
        if self.sharded:
            out = {}
            for k, v in self.model.state_dict().items():
                full = full_tensor(v)
                if self.rank == 0:
                    out[k] = full.detach().to(target)
                del full
            return out if self.rank == 0 else None
        state = merged_state(self.model) if self.lora else self.model.state_dict()
        return {k: v.detach().to(target) for k, v in state.items()}

    def weights(self) -> Optional[dict[str, torch.Tensor]]:
        """A float32 copy of the weights the model computes with, under the plain model's names (LoRA: merged),
        as a best-so-far snapshot or a saved folder holds them. Sharded: as `export_state` (rank 0 gets them)."""
        state = self.export_state("float32")
        return None if state is None else {k: v.clone() for k, v in state.items()}

    def load_weights(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Make the model compute with `state` (`weights`' names; strict=False: a saved folder's, which lists
        tied weights once). LoRA: into the base, the adapters zeroed. Sharded: every rank passes the whole
        state and keeps its shard."""
        if self.lora:
            load_merged_state(self.model, state, strict)
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
        else:
            self.model.load_state_dict(state, strict=strict)

    def reference(self):
        """Context in which a LoRA model computes its frozen base (adapters off): a LoRA run's reference
        policy. Without adapters there is no base to switch to: the run keeps a reference model of its own."""
        if not self.lora:
            raise RuntimeError("TrainEngine.reference(): only a LoRA engine holds its reference (lora.rank > 0)")
        return self.model.disable_adapter()     # peft's context manager

    def save_hf(self, out_dir: str, tokenizer=None, dtype: Optional[str] = None) -> Optional[str]:
        """The model as a Hugging Face folder (weights in `dtype`, default the compute dtype), atomically.
        Sharded: every rank calls it; rank 0 writes (a fresh model of the same class holds the gathered
        weights) and the others return None."""
        import copy

        from pipeline.checkpoint import save_hf_model

        target = DTYPES[dtype] if dtype else self.compute_dtype
        if self.sharded:
            state = self.export_state(dtype)
            if state is None:
                return None
            from torch.distributed.fsdp import FSDPModule

            cls = next(c for c in type(self.model).__mro__ if not issubclass(c, FSDPModule))
            model = cls(self.model.config).to(target)
            model.load_state_dict(state)
        elif self.lora:
            model = merged_copy(self.model).to(target)         # a copy already: cast in place
        else:
            model = self.model if target == torch.float32 else copy.deepcopy(self.model).to(target)
        return save_hf_model(model, tokenizer, out_dir)
