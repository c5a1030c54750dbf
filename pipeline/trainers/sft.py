"""Supervised fine-tuning: the token-mean negative log-likelihood of the response given the prompt, on the
shared `TrainEngine` (precision, micro-batches, clipping and the optimizer step are the engine's).

The layout is RL's: prompt ids left-padded with special tokens as generation adds them (or rendered by the
chat template), then the response + EOS, right-padded; the loss goes through `completion_forward`, the
very function RL's learner scores completions with, so SFT and RL see identical token layouts. Held-out
greedy exact match picks the best weights (early stopping restores them).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.engine import TrainEngine, lr_factor
from pipeline.evaluation import exact_match_accuracy
from pipeline.models import completion_forward
from pipeline.prompts import PromptFormat


def encode_supervised(tokenizer, prompts: list, answers: list[str],
                      prompt_format: Optional[PromptFormat] = None) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, answer) pairs in the RL layout: prompt_ids/prompt_mask (n, P) left-padded as
    generation sees them; completion_ids/completion_mask (n, T) = answer + <eos>, right-padded."""
    prompt_ids, prompt_mask, _ = (prompt_format or PromptFormat(tokenizer)).encode(prompts)
    answer_ids = tokenizer([str(a) for a in answers], add_special_tokens=False)["input_ids"]
    T = max(len(ids) for ids in answer_ids) + 1
    completion_ids = torch.full((len(answers), T), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(answers), T), dtype=torch.bool)
    for i, ids in enumerate(answer_ids):
        row = list(ids) + [tokenizer.eos_token_id]
        completion_ids[i, :len(row)] = torch.tensor(row)
        completion_mask[i, :len(row)] = True
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def select_rows(data: dict[str, torch.Tensor], index: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Rows `index` of an encoded set, with all-padding columns trimmed (left for prompts, right for
    completions) so short batches cost no extra compute."""
    rows = {k: v[index] for k, v in data.items()}
    first = int(rows["prompt_mask"].any(0).long().argmax())
    last = int(rows["completion_mask"].any(0).long().sum())
    return {
        "prompt_ids": rows["prompt_ids"][:, first:].to(device),
        "prompt_mask": rows["prompt_mask"][:, first:].to(device),
        "completion_ids": rows["completion_ids"][:, :last].to(device),
        "completion_mask": rows["completion_mask"][:, :last].to(device),
    }


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL of the completion tokens (answer + eos); prompt tokens carry no loss."""
    logprobs = completion_forward(model, **batch)["logprobs"]                 # (n, T)
    mask = batch["completion_mask"].float()
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1.0)


def supervised_finetune(model, tokenizer, prompts: list, answers: list[str],
                        eval_prompts: list, eval_answers: list[str], *, lr: float,
                        batch_size: int, max_steps: Optional[int] = None,
                        time_budget_s: Optional[float] = None, eval_every: int,
                        patience: Optional[int] = None, seed: int = 0, weight_decay: float = 0.0,
                        warmup_steps: int = 0, decay_steps: Optional[int] = None,
                        max_new_tokens: Optional[int] = None, max_grad_norm: float = 1.0,
                        compute_dtype: str = "float32", micro_batch_tokens: int = 0,
                        gradient_checkpointing: bool = False, prompt_format: Optional[PromptFormat] = None,
                        log: Callable[[str], None] = print) -> dict:
    """Train `model` in place on prompt -> answer + <eos> with AdamW (grad-norm clip), on a `TrainEngine`.

    The lr warms up linearly over `warmup_steps`, then stays constant, or decays (cosine) to 10% at
    `decay_steps`. Evaluates greedy exact match on the eval split at step 0 and every `eval_every` steps
    (eval time counts toward the budget: it is part of what a run costs). Stops at `max_steps`, after
    `time_budget_s`, or -- with `patience` -- once `patience` evals in a row bring no new best; then the
    best weights are restored (early stopping). Without patience the final weights are kept.
    Returns {"best_accuracy", "best_step", "final_accuracy", "curve": [(step, seconds, accuracy)],
    "steps", "seconds", "skipped_steps"}.
    """
    if max_steps is None and time_budget_s is None and patience is None:
        raise ValueError("supervised_finetune needs max_steps, time_budget_s or patience to stop")
    device = next(model.parameters()).device
    engine = TrainEngine(model, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         compute_dtype=compute_dtype, device=str(device), micro_batch_tokens=micro_batch_tokens,
                         gradient_checkpointing=gradient_checkpointing)
    prompt_format = prompt_format or PromptFormat(tokenizer)
    data = encode_supervised(tokenizer, prompts, answers, prompt_format)
    if max_new_tokens is None:  # longest eval answer + eos
        max_new_tokens = max(len(tokenizer(str(a), add_special_tokens=False)["input_ids"])
                             for a in eval_answers) + 1
    generator = torch.Generator().manual_seed(seed)
    n = len(prompts)
    length = data["prompt_ids"].shape[1] + data["completion_ids"].shape[1]

    def evaluate() -> float:
        return exact_match_accuracy(model, tokenizer, eval_prompts, eval_answers, max_new_tokens,
                                    prompt_format=prompt_format)

    start = time.perf_counter()
    accuracy = evaluate()
    curve = [(0, time.perf_counter() - start, accuracy)]
    best = {"accuracy": accuracy, "step": 0, "state": copy.deepcopy(model.state_dict())}
    evals_since_best, step, losses, order = 0, 0, [], torch.empty(0, dtype=torch.long)
    while True:
        elapsed = time.perf_counter() - start
        if (max_steps is not None and step >= max_steps) or \
                (time_budget_s is not None and elapsed >= time_budget_s):
            break
        if len(order) < batch_size:  # new epoch: reshuffle, keep the leftover rows first
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        engine.set_lr(lr * lr_factor(step, warmup_steps, decay_steps))
        tokens = data["completion_mask"][index].sum().clamp(min=1)
        loss_sum = 0.0
        for part in engine.micro_batches(index, length):   # token-mean over the batch = sum of shares
            weight = float(data["completion_mask"][part].sum() / tokens)
            with engine.autocast():
                loss = sft_loss(model, select_rows(data, part, device))
            engine.backward(loss, weight)
            loss_sum += weight * loss.item()
        engine.step()
        step += 1
        losses.append(loss_sum)
        if step % eval_every:
            continue
        accuracy = evaluate()
        elapsed = time.perf_counter() - start
        curve.append((step, elapsed, accuracy))
        log(f"step {step:5d}  loss {np.mean(losses):.4f}  eval acc {100 * accuracy:5.1f}%  {elapsed:6.1f} s")
        losses = []
        if accuracy > best["accuracy"]:
            best = {"accuracy": accuracy, "step": step, "state": copy.deepcopy(model.state_dict())}
            evals_since_best = 0
        else:
            evals_since_best += 1
            if patience is not None and evals_since_best >= patience:
                break
    if curve[-1][0] != step:  # budget ran out between evals: score the final weights too
        accuracy = evaluate()
        curve.append((step, time.perf_counter() - start, accuracy))
        if accuracy > best["accuracy"]:
            best = {"accuracy": accuracy, "step": step, "state": copy.deepcopy(model.state_dict())}
    final_accuracy = curve[-1][2]
    if patience is not None:
        model.load_state_dict(best["state"])
    return {"best_accuracy": best["accuracy"], "best_step": best["step"],
            "final_accuracy": final_accuracy, "curve": curve, "steps": step,
            "seconds": time.perf_counter() - start, "skipped_steps": engine.skipped_steps}


__all__ = ["encode_supervised", "select_rows", "sft_loss", "supervised_finetune"]
