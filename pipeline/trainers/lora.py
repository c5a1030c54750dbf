"""LoRA adapters through `peft`, as the training engine uses them: only the adapters train (and sit in the
optimizer and the checkpoint), the generators receive the merged weights under the base model's own names,
and the base without adapters is the reference policy, so a LoRA run holds no second copy of the model.

The merged weights are computed, never merged in place: peft's `merge_adapter` / `unmerge_adapter` add and
subtract the delta on the float32 base weights, and W + d - d is not W, so a run that exports after every
step would drift its base. `merged_state` adds each layer's delta to a copy of that layer's weight only.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from pipeline.errors import UserInputError

ALL_LINEAR = "all-linear"     # peft's name for every linear layer but the output layer


class LoraTargetError(UserInputError):
    """lora.target_modules names a module the model does not have."""


def lora_target_modules(names: list[str]):
    """The config's module list as peft takes it: ["all-linear"] is peft's string, else the list of names."""
    return ALL_LINEAR if list(names) == [ALL_LINEAR] else list(names)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str],
               train_in_full: tuple[str, ...] = ()) -> nn.Module:
    """`model` wrapped by peft with fresh adapters (B = 0, so the wrapped model computes what `model` did);
    every base parameter frozen but those of the top-level modules named in `train_in_full` (a reward model's
    new score head), which train as they are and sit in `adapter_state` beside the adapters. The adapters'
    A init draws from torch's global generator, which every data-parallel rank seeds alike."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=lora_target_modules(target_modules),
                        exclude_modules=list(train_in_full) or None)     # trained in full: no adapter on top
    try:
        with warnings.catch_warnings():     # peft asks transformers 5 a deprecated question: not the user's
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as e:   # peft: "Target modules {...} not found in the base model"
        raise LoraTargetError(f"lora.target_modules={list(target_modules)}: {e}. {_linear_layers_hint(model)}") \
            from None
    for name in train_in_full:
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    return wrapped


def _linear_layers_hint(model: nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D      # GPT-2's linear layers

    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
    return f"This model's linear layers are named {', '.join(names)}; or use [{ALL_LINEAR}]"


def check_target_modules(model_config, target_modules: list[str], where: str,
                         auto_class: str = "AutoModelForCausalLM") -> None:
    """Refuse a lora.target_modules name that matches no module of the model `model_config` describes (built
    by transformers' `auto_class`: a causal LM, or a reward model's AutoModelForSequenceClassification)
    (`where`: the model's path, for the message), before any learner loads it. The model is built on the meta
    device: module names without weights, so a big model costs no memory. A name matches as peft matches
    it (the module's full name, or its last dotted parts); stricter than peft, which refuses only when no
    name matches, because a mistyped second name would silently train fewer adapters than asked."""
    if lora_target_modules(target_modules) == ALL_LINEAR:
        return
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(model_config)
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise LoraTargetError(f"lora.target_modules={list(target_modules)}: {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not a module of {where}. "
                              f"{_linear_layers_hint(model)}")


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name in the base model: peft LoRA layer}."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter's delta added to its layer's weight, under the names
    the unwrapped model has (what a generator or `from_pretrained` loads). Detached; the model is unchanged."""
    layers = _lora_layers(model)
    deltas = {}
    with torch.no_grad():
        for name, layer in layers.items():
            delta = 0
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = delta + layer.get_delta_weight(adapter)
            deltas[name] = delta
        out = {}
        for key, value in model.get_base_model().state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module in deltas:
                value = value + deltas[module]
            out[key] = value.detach()
    return out


def _trained_in_full(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base parameters `apply_lora(train_in_full=...)` left trainable, by their name in the peft model."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trains: the adapters' weights (peft's names) and any module trained in full: what a LoRA
    checkpoint holds."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {**state, **{k: p.detach().clone() for k, p in _trained_in_full(model).items()}}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state`'s output; a missing or unexpected adapter weight raises (a checkpoint of another
    rank or target-module list must not load half)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    full = _trained_in_full(model)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    expected.update({k: tuple(p.shape) for k, p in full.items()})
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ValueError(f"the checkpoint's LoRA adapters do not match this model's (lora.rank / "
                         f"lora.target_modules changed?): missing {missing[:2]}, unexpected {unexpected[:2]}, "
                         f"other shape {[(k, got[k], expected[k]) for k in reshaped[:1]]}")
    set_peft_model_state_dict(model, {k: v for k, v in state.items() if k not in full})
    with torch.no_grad():
        for k, p in full.items():
            p.copy_(state[k])


def load_merged_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Make the LoRA model compute the plain model whose weights are `state` (`merged_state`'s names, e.g. a
    saved best model): the weights go into the base and every adapter's B is zeroed, so the delta is 0.
    strict=False: names missing from `state` keep their value (a saved folder lists tied weights once)."""
    targets = {k.replace(".base_layer.", "."): v for k, v in model.get_base_model().state_dict().items()
               if ".lora_" not in k}
    missing, unexpected = targets.keys() - state.keys(), state.keys() - targets.keys()
    if unexpected or (strict and missing):
        raise ValueError(f"weights do not match the model: missing {sorted(missing)[:2]}, unexpected "
                         f"{sorted(unexpected)[:2]}")
    with torch.no_grad():
        for k, v in state.items():
            targets[k].copy_(v)
        for layer in _lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.zero_()


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (no peft wrapper) with the adapters merged in, for `save_pretrained`."""
    import copy

    return copy.deepcopy(model).merge_and_unload()     # merged in the copy: the training model is untouched


__all__ = ["ALL_LINEAR", "LoraTargetError", "apply_lora", "check_target_modules", "merged_state", "adapter_state",
           "load_adapter_state", "load_merged_state", "merged_copy", "lora_target_modules"]
