"""The four remote actor types: rollout generators, reward scorers, the learner and the reference."""
from __future__ import annotations

import os

import ray

from pipeline.learner import Learner as _Learner
from pipeline.rewards import RewardComposer, ScoredShard
from pipeline.workers import ReferencePolicy, RolloutGenerator


@ray.remote
class RolloutWorker(RolloutGenerator):
    """Samples completions for its shard of prompts; receives weights after every update."""


@ray.remote
class RewardScorer(RewardComposer):
    """Scores a shard of completions with the configured reward functions."""

    def score_shard(self, sample_index: list[int], prompts: list[str], completions: list[str],
                    columns: dict[str, list]) -> tuple[list[int], ScoredShard]:
        return sample_index, self.score(prompts, completions, columns)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Learner(_Learner):
    """Policy (and critic) updates; exports weights for the generators."""

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Reference(ReferencePolicy):
    """Frozen reference log-probs for the KL term."""
