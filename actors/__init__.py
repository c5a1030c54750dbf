"""Ray actor shells. Each is a few lines around a plain class in `pipeline/` that runs without Ray."""
from actors.shells import Learner, Reference, RewardScorer, RolloutWorker

__all__ = ["Learner", "Reference", "RewardScorer", "RolloutWorker"]
