"""Supervised fine-tuning: the token-mean negative log-likelihood of the response given the prompt, on the
shared `TrainEngine` (precision, micro-batches, clipping and the optimizer step are the engine's).

The layout is RL's: prompt ids left-padded with special tokens as generation adds them (or rendered by the
chat template), then the response + EOS, right-padded; the loss goes through `completion_forward`, the
very function RL's learner scores completions with, so SFT and RL see identical token layouts. Held-out
greedy exact match picks the best weights (early stopping restores them).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pipeline.trainers.engine import lr_factor
from pipeline.rollout.evaluation import exact_match_accuracy
from pipeline.models import completion_forward
from pipeline.data.prompt_format import PromptFormat
from pipeline.trainers.loop import EngineTrainer, ShuffledRows, train_loop


def episode_ids(prompt_format: PromptFormat, turns: list[dict], chat: bool) -> tuple[list[int], list[bool]]:
    """A demonstrated episode after its prompt, in the agent loop's layout (`pipeline.rollout.agent`): each
    assistant turn's tokens (loss 1), then in a chat its end-of-turn token; each other message (a tool's result,
    the environment's answer) as an observation (loss 0): its text alone, or in a chat the bridge's render of it
    as the next turn. The last turn (an assistant's) ends with <eos> outside a chat. -> (ids, loss mask)."""
    from pipeline.rollout.chat_bridge import ChatBridge

    tok = prompt_format.tokenizer
    bridge = ChatBridge(tok, prompt_format.end_of_turn_id()) if chat else None
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            part = tok(m["content"], add_special_tokens=False)["input_ids"]
            part += [bridge.end_of_turn_id] if chat else ([tok.eos_token_id] if i == len(turns) - 1 else [])
        else:
            part = bridge.observation_ids([m]) if chat else tok(m["content"], add_special_tokens=False)["input_ids"]
        ids += part
        mask += [m["role"] == "assistant"] * len(part)
    return ids, mask


def encode_supervised(tokenizer, prompts: list, answers: list, prompt_format: Optional[PromptFormat] = None
                      ) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, answer) pairs in the RL layout: prompt_ids/prompt_mask (n, P) left-padded as
    generation sees them; completion_ids/completion_mask (n, T) = answer + its end, right-padded; loss_mask
    (n, T) the tokens trained on. The end is the chat template's end-of-turn token where the template rendered
    the prompt (the reply is an assistant turn, and other runtimes stop on that token), else <eos>. An answer
    given as a list of messages is a demonstrated episode (`episode_ids`): its observations are attended to,
    with loss 0."""
    prompt_format = prompt_format or PromptFormat(tokenizer)
    prompt_ids, prompt_mask, _ = prompt_format.encode(prompts)
    rendered = prompt_format.render(prompts)[1]
    end_of_turn = prompt_format.end_of_turn_id() if any(rendered) else None
    rows = []
    for i, a in enumerate(answers):
        if isinstance(a, list):
            rows.append(episode_ids(prompt_format, a, rendered[i]))
            continue
        end = end_of_turn if rendered[i] and end_of_turn is not None else tokenizer.eos_token_id
        ids = list(tokenizer(str(a), add_special_tokens=False)["input_ids"]) + [end]
        rows.append((ids, [True] * len(ids)))
    T = max(len(ids) for ids, _ in rows)
    completion_ids = torch.full((len(answers), T), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(answers), T), dtype=torch.bool)
    loss_mask = torch.zeros((len(answers), T), dtype=torch.bool)
    for i, (ids, trained) in enumerate(rows):
        completion_ids[i, :len(ids)] = torch.tensor(ids)
        completion_mask[i, :len(ids)] = True
        loss_mask[i, :len(ids)] = torch.tensor(trained)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask, "loss_mask": loss_mask}


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
        "loss_mask": rows["loss_mask"][:, :last].to(device),
    }


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL of the trained tokens (answer + eos; a demonstrated episode's assistant turns); prompt and
    observation tokens carry no loss."""
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    logprobs = completion_forward(model, **inputs)["logprobs"]                # (n, T)
    mask = batch["loss_mask"].float()
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1.0)


class SupervisedTrainer(EngineTrainer):
    """Supervised fine-tuning of a causal LM on (prompt, response) pairs, one `TrainEngine` step at a time;
    `pipeline.trainers.loop.train_loop` drives it (evaluation, early stopping, checkpoints).

    Minibatches come from `ShuffledRows` (seeded; its state is part of `state()`, so a resumed run sees
    exactly the rows the interrupted one would have). Held-out metrics: `eval/loss` (token-mean NLL
    of the held-out responses) always, `eval/accuracy` (greedy exact match against `eval_answers`) when
    answers are given; the early-stopping score is the accuracy if there is one, else minus the loss.
    The lr warms up linearly over `warmup_steps`, then stays constant or decays (cosine) to 10% at
    `decay_steps`. rank / world_size / group: as one of several data-parallel learners (`EngineTrainer`);
    lora: adapters instead of full fine-tuning (`TrainEngine`).
    """

    def __init__(self, model, tokenizer, prompts: list, responses: list[str], eval_prompts: list,
                 eval_responses: list[str], eval_answers: Optional[list[str]] = None, *, lr: float,
                 batch_size: int, seed: int = 0, weight_decay: float = 0.0, warmup_steps: int = 0,
                 decay_steps: Optional[int] = None, max_new_tokens: Optional[int] = None,
                 max_grad_norm: float = 1.0, compute_dtype: str = "float32", micro_batch_tokens: int = 0,
                 gradient_checkpointing: bool = False, prompt_format: Optional[PromptFormat] = None,
                 eval_batch_size: int = 250, rank: int = 0, world_size: int = 1, group=lambda: None,
                 lora: Optional[dict] = None):
        self._start(model, tokenizer, rank, world_size, group, lr=lr, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm, compute_dtype=compute_dtype, lora=lora,
                    micro_batch_tokens=micro_batch_tokens, gradient_checkpointing=gradient_checkpointing)
        self.prompt_format = prompt_format or PromptFormat(tokenizer)
        self.data = encode_supervised(tokenizer, prompts, responses, self.prompt_format)
        self.eval_data = encode_supervised(tokenizer, eval_prompts, eval_responses, self.prompt_format)
        self.eval_prompts, self.eval_answers = eval_prompts, eval_answers
        if max_new_tokens is None and eval_answers is not None:   # longest eval answer + eos
            max_new_tokens = max(len(tokenizer(str(a), add_special_tokens=False)["input_ids"])
                                 for a in eval_answers) + 1
        self.max_new_tokens = max_new_tokens
        self.lr, self.batch_size, self.eval_batch_size = lr, batch_size, eval_batch_size
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.rows = ShuffledRows(len(self.data["prompt_ids"]), batch_size, seed)
        self.length = self.data["prompt_ids"].shape[1] + self.data["completion_ids"].shape[1]

    def train_step(self) -> dict[str, float]:
        index = self.rows.next()
        tokens = self.data["loss_mask"][index].sum().clamp(min=1)   # of the whole minibatch, every rank

        def loss(part):
            value = sft_loss(self.model, select_rows(self.data, part, self.device))
            return value, {"loss": value.item()}

        figures, _ = self.engine.train_step(      # token-mean = the micro-batches' shares, summed
            self.my_rows(index), self.length, loss,
            lambda part: float(self.data["loss_mask"][part].sum() / tokens),
            lr=self.lr * lr_factor(self.step_count, self.warmup_steps, self.decay_steps), **self.step_shares(index))
        self.step_count += 1
        return {"loss": figures.get("loss", 0.0)}    # this rank's share: the ranks' sum is the minibatch's loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics = {}
        if self.eval_answers is not None:
            metrics["eval/accuracy"] = exact_match_accuracy(
                self.model, self.tokenizer, self.eval_prompts, self.eval_answers, self.max_new_tokens,
                prompt_format=self.prompt_format)
        n = len(self.eval_data["prompt_ids"])
        nll, tokens = 0.0, 0.0
        for rows in torch.arange(n).split(self.eval_batch_size):
            batch = select_rows(self.eval_data, rows, self.device)
            with self.engine.autocast():
                count = float(batch["loss_mask"].sum())
                nll += sft_loss(self.model, batch).item() * count
            tokens += count
        metrics["eval/loss"] = nll / max(tokens, 1.0)
        return metrics

    @staticmethod
    def score(metrics: dict[str, float]) -> float:
        return metrics["eval/accuracy"] if "eval/accuracy" in metrics else -metrics["eval/loss"]


def supervised_finetune(model, tokenizer, prompts: list, answers: list[str],
                        eval_prompts: list, eval_answers: list[str], *, lr: float,
                        batch_size: int, max_steps: Optional[int] = None,
                        time_budget_s: Optional[float] = None, eval_every: int,
                        patience: Optional[int] = None, seed: int = 0, log: Callable[[str], None] = print,
                        **options) -> dict:
    """Train `model` in place on prompt -> answer + <eos> (a `SupervisedTrainer` with `options`), scoring
    greedy exact match on the eval split at step 0 and every `eval_every` steps; stops at `max_steps`, after
    `time_budget_s`, or once `patience` evals in a row bring no new best, and then restores the best weights.
    Returns {"best_accuracy", "best_step", "final_accuracy", "curve": [(step, seconds, accuracy)],
    "steps", "seconds", "skipped_steps"}.
    """
    trainer = SupervisedTrainer(model, tokenizer, prompts, answers, eval_prompts, eval_answers, eval_answers,
                                lr=lr, batch_size=batch_size, seed=seed, **options)
    result = train_loop(trainer, eval_every=eval_every, max_steps=max_steps, time_budget_s=time_budget_s,
                        patience=patience, log=log)
    return {"best_accuracy": result["best_metrics"]["eval/accuracy"], "best_step": result["best_step"],
            "final_accuracy": result["final_metrics"]["eval/accuracy"],
            "curve": [(s, t, m["eval/accuracy"]) for s, t, m in result["curve"]],
            "steps": result["steps"], "seconds": result["seconds"], "skipped_steps": result["skipped_steps"]}


__all__ = ["SupervisedTrainer", "encode_supervised", "episode_ids", "select_rows", "sft_loss", "supervised_finetune"]
