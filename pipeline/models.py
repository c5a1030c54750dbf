"""Models: loading any Hugging Face causal LM ready for RL, the value model, and the forward path every
stage shares to score completions.

Shapes follow `pipeline.batch`: n sequences, P prompt tokens (left-padded), T completion tokens
(right-padded), V vocabulary entries, H hidden size.

`completion_forward` is the single definition of "the log-prob of a completion" on the training side: the
learner, the reference model, supervised fine-tuning and the tests all go through it (the samplers in
`pipeline.rollout.generation` record the same quantity, log softmax(raw logits / temperature), while sampling).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.algorithms.core import entropy_from_logits, logprobs_from_logits
from pipeline.errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(UserInputError):
    """A model or tokenizer path that cannot be loaded; the message names the path and the fix."""


_FIX = ("Pass a local folder made by save_pretrained (with config.json and tokenizer files) or a cached hub "
        "name, or build the demo model with `rlpipe warmstart`.")


# ----------------------------------------------------------------------------- loading

def check_model_path(path, what: str = "model") -> str:
    """A local folder must exist and hold config.json; anything else is taken as a hub name. -> the path."""
    path = str(path)
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith(("/", "./", "../", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"{what} {path!r} does not exist. {_FIX}")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelLoadError(f"{what} {path!r} is not a Hugging Face model folder (no config.json). {_FIX}")
    return str(local) if local.is_dir() else path


def _load_error(what: str, path: str, err: Exception) -> ModelLoadError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
    offline = " (offline mode: only local folders or cached hub names work)" \
        if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ModelLoadError(f"could not load the {what} from {path!r}{offline}: {first_line}. {_FIX}")


def load_model_config(path, what: str = "model"):
    """`AutoConfig` for `path`, or one ModelLoadError naming the path and the fix."""
    from transformers import AutoConfig

    path = check_model_path(path, what)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError for the many ways this fails
        raise _load_error(f"{what} config", path, err) from None
    return config


def zero_dropout(config) -> dict[str, float]:
    """Set every float dropout probability of an HF config (and of its sub-configs) to 0.
    -> {dotted field: its value before}, so that an exported model can ship the values it came with.

    RL compares log-probs of two forwards (sampler and learner, learner before and after): with dropout on,
    the importance ratio is not 1 at lr 0 and rollout-time values are noisy. GPT-2 (`*_pdrop`), Phi
    (`resid_pdrop`), BERT (`*_dropout_prob`) and some Llama fine-tunes (`attention_dropout`) ship dropout.
    OpenRLHF and verl zero it the same way, before the model is built.
    """
    from transformers import PretrainedConfig

    changed: dict[str, float] = {}
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            changed.update({f"{name}.{n}": v for n, v in zero_dropout(value).items()})
        elif isinstance(value, float) and value > 0 and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)
            changed[name] = value
    return changed


def set_config_values(config, values: dict) -> None:
    """Set dotted config fields (as `zero_dropout` reports them), e.g. to put the original dropout back."""
    for dotted, value in values.items():
        *parents, name = dotted.split(".")
        target = config
        for p in parents:
            target = getattr(target, p)
        setattr(target, name, value)


def _no_dropout_modules(model: nn.Module) -> nn.Module:
    """Dropout modules a model builds with a hard-coded p (not from its config) get p = 0 too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@contextlib.contextmanager
def load_report_silenced():
    """transformers' load report ("lm_head.weight UNEXPECTED", "score.weight MISSING") off for a load whose
    unused or new weights are the point: a causal LM's trunk as a critic, a new reward model's score head."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path):
    """`AutoTokenizer` for `path`, left-padded (prompts are left-padded for generation), with a pad token."""
    from transformers import AutoTokenizer

    path = check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # HF raises OSError, ValueError, HFValidationError, ... for bad paths
        raise _load_error("tokenizer", path, err) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # harmless: pad positions are always masked out
    return tokenizer


def load_causal_lm(path, dtype: str = "float32", device: str = "cpu", disable_dropout: bool = True):
    """`AutoModelForCausalLM` for `path` with weights in `dtype` ("float32" | "bfloat16" | "float16") on
    `device`; dropout off unless `disable_dropout=False` (see `zero_dropout`)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    config = load_model_config(path, "causal LM")
    zeroed = zero_dropout(config) if disable_dropout else {}
    path = check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[dtype])
    except Exception as err:
        raise _load_error("causal LM", path, err) from None
    if disable_dropout:
        _no_dropout_modules(model)
    model.zeroed_dropout = zeroed      # what `save_hf_model` writes back: training's switch stays ours
    return model.to(device)


def enable_activation_checkpointing(model) -> None:
    """HF (non-reentrant) activation checkpointing: layers recompute their activations in backward.
    transformers 5 names it `activation_checkpointing_enable`; 4.x `gradient_checkpointing_enable`."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation (gradient) checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its classes named in `_no_split_modules`, e.g.
    LlamaDecoderLayer), found in any submodule (a ValueModel's backbone): the units sharding gathers."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules): "
                         "it cannot be sharded by block; use learner.parallel=replicate")
    return blocks


def activation_checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def values_from_hidden(value_head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """(n, L, H) hidden states (any dtype) -> (n, L) float32 values from a float32 linear head.

    Outside autocast on purpose: a value head regresses returns, and a bf16 head (or a bf16 hidden state
    fed to an fp32 head) either loses precision or fails on the dtype mismatch.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return value_head(hidden.float()).squeeze(-1)


def new_value_head(hidden_size: int) -> nn.Linear:
    """A zero-initialised float32 value head: V(s) starts at 0, so early advantages equal the returns."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    head.keep_float32 = True        # sharding gathers it in float32, whatever the compute dtype (`shard_model`)
    return head


class ValueModel(nn.Module):
    """A transformer trunk (no LM head) with a float32 linear value head: PPO's separate critic (and the
    shape a learned reward model takes)."""

    def __init__(self, path, dtype: str = "float32", disable_dropout: bool = True):
        super().__init__()
        from transformers import AutoModel

        config = load_model_config(path, "value model backbone")
        zeroed = zero_dropout(config) if disable_dropout else {}
        path = check_model_path(path)
        reward_model = config.num_labels == 1 and any(
            n.endswith("ForSequenceClassification") for n in (getattr(config, "architectures", None) or []))
        score_head = None
        try:
            with load_report_silenced():    # a causal LM's lm_head is unused here, as intended
                if reward_model:            # DeepSpeed-Chat / OpenRLHF: the critic starts as the reward model
                    from transformers import AutoModelForSequenceClassification

                    full = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                                              dtype=DTYPES[dtype])
                    self.backbone, score_head = full.base_model, getattr(full, "score", None)
                else:
                    self.backbone = AutoModel.from_pretrained(path, config=config, dtype=DTYPES[dtype])
        except Exception as err:
            raise _load_error("value model backbone", path, err) from None
        if reward_model and score_head is None:
            raise ModelLoadError(f"critic {path!r} is a reward model without a per-token score head (an encoder's "
                                 "pooled classifier); a critic reads the policy's tokens: give a decoder reward model "
                                 "trained on the policy's tokenizer, or a causal LM")
        if disable_dropout:
            _no_dropout_modules(self.backbone)
        self.backbone.zeroed_dropout = zeroed
        self.value_head = new_value_head(self.backbone.config.get_text_config().hidden_size)
        if score_head is not None:
            with torch.no_grad():
                self.value_head.weight.copy_(score_head.weight.float())
                if getattr(score_head, "bias", None) is not None:
                    self.value_head.bias.copy_(score_head.bias.float())

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.backbone, "supports_gradient_checkpointing", False)

    def activation_checkpointing_enable(self, kwargs=None) -> None:
        enable_activation_checkpointing(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, attention_mask: (n, L) -> values (n, L) float32, one per position."""
        if position_ids is None:
            position_ids = left_padded_positions(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # (n, L, H)
        return values_from_hidden(self.value_head, hidden)


# ----------------------------------------------------------------------------- the forward path

def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, L) mask -> (n, L) long position ids that start at 0 on each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def used_columns(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[int, int]:
    """(first prompt column, completion columns) that hold some row's real token: the columns before the
    first (prompts are left-padded) and after the second (completions are right-padded) hold padding in every
    row, so a forward can drop them and lose nothing. At least the last prompt column (it predicts the first
    completion token) and one completion column are kept."""
    P = prompt_mask.shape[1]
    used_p = prompt_mask.any(0).nonzero()
    used_t = completion_mask.any(0).nonzero()
    first = min(int(used_p[0]) if len(used_p) else P - 1, P - 1)
    return first, max(int(used_t[-1]) + 1 if len(used_t) else 0, 1)


def used_sequence(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cat(prompt, completion) over the used columns only (`used_columns`). -> (input_ids, attention_mask (long),
    P, T): the kept prompt and completion widths; position P - 1 + t predicts completion token t."""
    first, width = used_columns(prompt_mask, completion_mask)
    input_ids = torch.cat([prompt_ids[:, first:], completion_ids[:, :width]], dim=1)
    attention_mask = torch.cat([prompt_mask[:, first:], completion_mask[:, :width]], dim=1).long()
    return input_ids, attention_mask, prompt_ids.shape[1] - first, width


def pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, t, ...) -> (n, width, ...): zeros after the first t columns (positions a trimmed forward dropped)."""
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))], dim=1)


def completion_forward(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                       temperature: float = 1.0, want_entropy: bool = False, entropy_grad: bool = False,
                       want_hidden: bool = False) -> dict:
    """Score completions under `model` with one forward pass over cat(prompt, completion).

    prompt_ids, prompt_mask: (n, P), left-padded; completion_ids, completion_mask: (n, T), right-padded.
    Returns {"logprobs": (n, T) float32 log softmax(logits / temperature) at the completion ids,
             "entropy": (n, T) float32 (if want_entropy; differentiable only with entropy_grad, which keeps
             an (n, T, V) softmax for the backward pass), "hidden": (n, T, H) last hidden state at the
             position that predicts each completion token (if want_hidden; input for a value head)}.
    Values at masked positions are meaningless but finite, also where the model gives a token -inf.
    The pass runs only over the columns some row uses (`used_columns`): compute follows the real tokens of
    these rows, and the columns it dropped come back as zeros.
    """
    T_full = completion_ids.shape[1]
    input_ids, attention_mask, P, T = used_sequence(prompt_ids, prompt_mask, completion_ids, completion_mask)
    completion_ids = completion_ids[:, :T]                                       # (n, T): the kept columns
    # Logits at positions P-1 .. P+T-2 predict completion tokens 0 .. T-1. Asking the model for only the
    # last T+1 positions spares the (n, P, V) prompt logits; the very last position is dropped below.
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=left_padded_positions(attention_mask),
                output_hidden_states=want_hidden, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, -(T + 1):-1]                                          # (n, T, V)
    result = {"logprobs": logprobs_from_logits(logits, completion_ids, temperature)}
    if want_entropy:
        if entropy_grad:
            result["entropy"] = entropy_from_logits(logits, temperature)
        else:                    # a metric only: no (n, T, V) softmax is kept for a backward pass
            with torch.no_grad():
                detached = logits.detach()
                if detached.dtype == torch.float32:
                    result["entropy"] = entropy_from_logits(detached, temperature)
                else:            # half precision: upcast one sequence at a time, never the whole batch
                    result["entropy"] = torch.stack([entropy_from_logits(row, temperature) for row in detached])
    if want_hidden:
        result["hidden"] = out.hidden_states[-1][:, P - 1:P + T - 1]             # (n, T, H)
    return {k: pad_columns(v, T_full) for k, v in result.items()}


__all__ = [
    "DTYPES", "ModelLoadError", "ValueModel", "check_model_path", "load_model_config", "zero_dropout",
    "load_tokenizer", "load_causal_lm", "values_from_hidden", "new_value_head", "left_padded_positions",
    "used_columns", "used_sequence", "pad_columns", "completion_forward",
]
