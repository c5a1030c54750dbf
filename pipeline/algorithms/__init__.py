"""The pure math of the pipeline: masked reductions, KL estimators, losses, advantage estimators.

Only torch and `pipeline.registry` are imported here; no Ray, config or model classes.
"""
from pipeline.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    compute_advantages,
    gae_advantages_and_returns,
    place_sequence_reward,
)
from pipeline.algorithms.core import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_policy_loss,
    truncated_importance_weights,
    clipped_value_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "compute_advantages",
    "gae_advantages_and_returns",
    "place_sequence_reward",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "clipped_policy_loss",
    "truncated_importance_weights",
    "clipped_value_loss",
    "entropy_from_logits",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
]
