"""The K data-parallel learners as one learner.

Every rank holds the whole model and takes the same step, so verbs that change state (update, load a
checkpoint) go to every rank, and questions (values and pi_old of a rollout, the weights, the optimizer
state, the final model) go to rank 0, whose answer every rank would give alike. The driver never names a
rank: a sharded engine (FSDP2) only changes which verbs must fan out, here.
"""
from __future__ import annotations

import ray

from actors.resilient import get_all


class LearnerGroup:
    def __init__(self, learners: list):
        self.ranks = list(learners)           # actor handles, rank order

    @property
    def rank0(self):
        return self.ranks[0]

    def update(self, batch) -> dict[str, float]:
        """Every rank gets the whole batch (one object in the store) and updates on its slice; rank 0 reports
        (the figures are already summed over ranks)."""
        ref = ray.put(batch)
        return get_all([learner.update.remote(ref) for learner in self.ranks])[0]

    def submit_rollout_forward(self, rollout, old_logprobs: bool, ref_logprobs: bool = False):
        """Ref to {"values", "old_logprobs", "ref_logprobs"} of a fresh rollout (submitted; the driver gathers
        it together with the reference actor's log-probs, when there is one)."""
        return self.rank0.rollout_forward.remote(rollout, old_logprobs, ref_logprobs)

    def export_weights(self):
        """Ref to a checksummed weights packet of the current policy (in the generators' dtype)."""
        return self.rank0.export_weights.remote()

    def weights_spec(self) -> list:
        return ray.get(self.rank0.weights_spec.remote())

    def submit_broadcast(self):
        """Ref to rank 0's side of a weight broadcast (the generators' side is submitted by the caller)."""
        return self.rank0.broadcast_weights.remote()

    def checksums(self) -> list[str]:
        """Every rank's checksum of its policy as the generators would hold it (all equal when in step)."""
        return ray.get([learner.checksum.remote() for learner in self.ranks])

    def state(self) -> tuple[dict, dict]:
        return ray.get(self.rank0.state.remote())

    def load_state(self, models: dict, optimizers: dict, version: int) -> None:
        ray.get([learner.load_state.remote(models, optimizers, version) for learner in self.ranks])

    def hf_files(self) -> dict[str, bytes]:
        """The final model's folder as bytes: the learner may run on another node than the driver."""
        return ray.get(self.rank0.hf_files.remote())
