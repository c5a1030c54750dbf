"""Reward-model training (DeepSpeed-Chat step 2): a one-label sequence classifier trained on preference pairs
with the Bradley-Terry loss (`pipeline.algorithms.preference`), on the shared `TrainEngine`; the loop is
`pipeline.trainers.loop.train_loop` (held-out pairwise accuracy picks the best weights).

Each step scores a minibatch's chosen and rejected responses in one forward (2n rows, right-padded), so both
sides of a pair see identical weights and numerics.
"""
from __future__ import annotations

from typing import Optional

import torch

from pipeline.algorithms.preference import bradley_terry_loss, pairwise_accuracy
from pipeline.trainers.engine import lr_factor
from pipeline.rewards.models import encode_for_reward, pad_right, reward_scores, score_heads
from pipeline.trainers.loop import EngineTrainer, ShuffledRows


class RewardModelTrainer(EngineTrainer):
    """model: from `pipeline.rewards.models.build_reward_model`; train / held_out: `PreferencePairs`;
    rank / world_size / group: as one of several data-parallel learners (`EngineTrainer`); lora: adapters on the
    backbone, the new score head trained in full."""

    def __init__(self, model, tokenizer, train, held_out, *, lr: float, batch_size: int, seed: int = 0,
                 weight_decay: float = 0.0, warmup_steps: int = 0, decay_steps: Optional[int] = None,
                 max_grad_norm: float = 1.0, compute_dtype: str = "float32", micro_batch_tokens: int = 0,
                 gradient_checkpointing: bool = False, max_length: Optional[int] = None,
                 eval_batch_size: int = 64, rank: int = 0, world_size: int = 1, group=lambda: None,
                 lora: Optional[dict] = None):
        if lora:          # the score head is new: it trains in full beside the backbone's adapters
            lora = {**lora, "train_in_full": score_heads(model)}
        self._start(model, tokenizer, rank, world_size, group, lr=lr, weight_decay=weight_decay,
                    max_grad_norm=max_grad_norm, compute_dtype=compute_dtype, lora=lora,
                    micro_batch_tokens=micro_batch_tokens, gradient_checkpointing=gradient_checkpointing)
        self.train, self.held_out = self._encode(train, max_length), self._encode(held_out, max_length)
        self.lr, self.warmup_steps, self.decay_steps = lr, warmup_steps, decay_steps
        self.eval_batch_size = eval_batch_size
        self.rows = ShuffledRows(len(train), batch_size, seed)

    def _encode(self, pairs, max_length) -> dict:
        layout = self.model.reward_layout
        return {"chosen": encode_for_reward(self.tokenizer, pairs.prompts, pairs.chosen, layout, max_length),
                "rejected": encode_for_reward(self.tokenizer, pairs.prompts, pairs.rejected, layout, max_length),
                "margin": None if pairs.margins is None else torch.tensor(pairs.margins)}

    def _scores(self, data: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [data["chosen"][i] for i in index] + [data["rejected"][i] for i in index]
        scores = reward_scores(self.model, pad_right(rows, self.tokenizer.pad_token_id, self.device))
        return scores[:len(index)], scores[len(index):]

    def _loss(self, data: dict, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = self._scores(data, index)
        margin = None if data["margin"] is None else data["margin"][index].to(self.device)
        return bradley_terry_loss(chosen, rejected, margin), chosen, rejected

    def train_step(self) -> dict[str, float]:
        index = self.rows.next()
        mine = self.my_rows(index)
        length = 2 * max(len(self.train[side][i]["input_ids"]) for side in ("chosen", "rejected")
                         for i in index)         # the whole minibatch's: every rank splits it alike

        def loss(part):
            value = self._loss(self.train, part)[0]
            return value, {"loss": value.item()}

        figures, _ = self.engine.train_step(      # pair-mean over the whole minibatch = sum of shares
            mine, length, loss, lambda part: len(part) / len(index),
            lr=self.lr * lr_factor(self.step_count, self.warmup_steps, self.decay_steps), **self.step_shares(index))
        self.step_count += 1
        return {"loss": figures.get("loss", 0.0)}    # this rank's share: the ranks' sum is the minibatch's loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        chosen, rejected = [], []
        for index in torch.arange(len(self.held_out["chosen"])).split(self.eval_batch_size):
            with self.engine.autocast():
                c, r = self._scores(self.held_out, index)
            chosen.append(c)
            rejected.append(r)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        margin = None if self.held_out["margin"] is None else self.held_out["margin"].to(chosen.device)
        return {"eval/accuracy": pairwise_accuracy(chosen, rejected),
                "eval/loss": float(bradley_terry_loss(chosen, rejected, margin)),
                "eval/score_gap": float((chosen - rejected).mean())}

    @staticmethod
    def score(metrics: dict[str, float]) -> float:
        return metrics["eval/accuracy"]


__all__ = ["RewardModelTrainer"]
