"""The K data-parallel learners as one learner.

Replicated, every rank holds the whole model and takes the same step, so verbs that change state (update,
load a checkpoint) go to every rank, and questions (values and pi_old of a rollout, the weights, the
optimizer state, the final model) go to rank 0, whose answer every rank would give alike. Sharded (FSDP2,
learner.parallel=shard), every question needs every rank: a rollout's forward is split over the ranks and
its parts concatenated here; weights, checkpoint state and the final model are gathered to rank 0, whose
answer is the one kept. The driver never names a rank.
"""
from __future__ import annotations

import ray
import torch

from actors.resilient import get_all


@ray.remote(num_cpus=0)
def _concatenate(*parts: dict) -> dict:
    """One rollout forward from the ranks' consecutive slices (a task: the driver keeps one ref to gather)."""
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}


class LearnerGroup:
    def __init__(self, learners: list, sharded: bool = False):
        self.ranks = list(learners)           # actor handles, rank order
        self.sharded = sharded and len(self.ranks) > 1

    @property
    def rank0(self):
        return self.ranks[0]

    def _ask(self, method: str, *args):
        """Ref to rank 0's answer; sharded, every rank is asked (they gather together) and rank 0 answers."""
        refs = [getattr(learner, method).remote(*args) for learner in (self.ranks if self.sharded else [self.rank0])]
        return refs[0]

    def update(self, batch) -> dict[str, float]:
        """Every rank gets the whole batch (one object in the store) and updates on its slice; rank 0 reports
        (the figures are already summed over ranks)."""
        ref = ray.put(batch)
        return get_all([learner.update.remote(ref) for learner in self.ranks])[0]

    def submit_rollout_forward(self, rollout, old_logprobs: bool, ref_logprobs: bool = False):
        """Ref to {"values", "old_logprobs", "ref_logprobs"} of a fresh rollout (submitted; the driver gathers
        it together with the reference actor's log-probs, when there is one)."""
        if not self.sharded:
            return self.rank0.rollout_forward.remote(rollout, old_logprobs, ref_logprobs)
        ref = ray.put(rollout)
        return _concatenate.remote(*[learner.rollout_forward.remote(ref, old_logprobs, ref_logprobs)
                                     for learner in self.ranks])

    def export_weights(self):
        """Ref to a checksummed weights packet of the current policy (in the generators' dtype)."""
        return self._ask("export_weights")

    def weights_spec(self) -> list:
        return ray.get(self.rank0.weights_spec.remote())      # shapes only: nothing to gather

    def submit_broadcast(self):
        """Ref to rank 0's side of a weight broadcast (the generators' side is submitted by the caller)."""
        return self._ask("broadcast_weights")

    def checksums(self) -> list[str]:
        """Every replica's checksum of its policy as the generators would hold it (all equal when in step);
        sharded, the one gathered policy's."""
        return [c for c in ray.get([learner.checksum.remote() for learner in self.ranks]) if c is not None]

    def state(self) -> tuple[dict, dict]:
        return ray.get(self._ask("state"))

    def load_state(self, models: dict, optimizers: dict, version: int) -> None:
        ray.get([learner.load_state.remote(models, optimizers, version) for learner in self.ranks])

    def hf_files(self) -> dict[str, bytes]:
        """The final model's folder as bytes: the learner may run on another node than the driver."""
        return ray.get(self._ask("hf_files"))
