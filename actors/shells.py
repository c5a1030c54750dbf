"""The four remote actor types: rollout generators, reward scorers, learners and the reference. Each is a
few lines around a plain class of `pipeline/` that runs, and is tested, without Ray."""
from __future__ import annotations

import os

import ray

from pipeline.rollout.generator import RolloutGenerator
from pipeline.rollout.reference import ReferencePolicy
from pipeline.rewards.functions import RewardComposer, ScoredShard
from pipeline.trainers.ppo import PolicyLearner


class _OnRayNode:
    """What only Ray knows about the process: the address other nodes reach it at (process groups)."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class RolloutWorker(_OnRayNode, RolloutGenerator):
    """Samples completions for its shard of prompts; receives weights after every update."""


@ray.remote
class RewardScorer(RewardComposer):
    """Scores a shard of completions with the configured reward functions and reward models (loaded once,
    when the scorer starts or restarts)."""

    def __init__(self, functions, weights, failed_reward, models=(), device="cpu", threads=1):
        import torch

        torch.set_num_threads(threads)
        super().__init__(functions, weights, failed_reward, models, device)

    def reward_models_loaded(self) -> int:
        """Reward models this process has loaded since it started."""
        from pipeline.rewards.models import LOADS

        return LOADS["count"]

    def score_shard(self, sample_index: list[int], prompts: list, completions: list[str],
                    columns: dict[str, list]) -> tuple[list[int], ScoredShard]:
        return sample_index, self.score(prompts, completions, columns)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Learner(_OnRayNode, PolicyLearner):
    """Policy (and critic) updates on one rank; exports weights for the generators."""


@ray.remote
class Reference(_OnRayNode, ReferencePolicy):
    """Frozen reference log-probs for the KL term."""
