"""Data-parallel learners for the supervised commands (`rlpipe sft`, `rlpipe reward-model`, `--learners K`).

Each learner is a Ray actor around the run's own trainer (`SupervisedTrainer`, `RewardModelTrainer`), built on
its node by the run's `build(rank, world_size, group)`: every rank walks the same minibatch order, computes
its share, and the engine sums gradients over the "learners" group, so K learners take the step one would.
`DataParallelTrainer` puts the K actors behind the one-trainer interface `pipeline.trainers.loop.train_loop`
drives: steps go to every rank, questions (held-out metrics, weights, checkpoint state) to rank 0, whose
answer every rank would give alike; stop decisions stay with the loop, in the driver, so the ranks never
disagree about when to stop. With `--parallel shard` every rank holds 1/K of the model (FSDP2, sharded when
it joins the group), so every question goes to every rank (each forward gathers from all of them) and rank
0's answer is kept. The model folder is written where the driver runs (rank 0 may be on another node).
"""
from __future__ import annotations

import os
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.pools import ClusterTooSmall, check_fits, connect_group
from actors.resilient import get_all
from actors.shells import _OnRayNode
from pipeline.checkpoint import read_folder, write_folder
from pipeline.collective import DP_GROUP, GroupMember, resolve_backend


@ray.remote
class SupervisedLearner(_OnRayNode, GroupMember):
    """One rank: the trainer `build` makes, with this actor's process group."""

    def __init__(self, build: Callable, rank: int, world_size: int, threads: int, shard: bool = False,
                 cpu_offload: bool = False):
        import torch

        torch.set_num_threads(threads)
        self.trainer = build(rank=rank, world_size=world_size, group=lambda: self.group(DP_GROUP))
        self.sharded, self.cpu_offload = shard, cpu_offload

    def join_group(self, name: str, host: str, port: int, rank: int, size: int, backend: str = "gloo",
                   timeout_s: float = 60.0, world: bool = False) -> None:
        """As GroupMember's; a sharded run's learners shard their model over the group they join."""
        shard = name == DP_GROUP and self.sharded
        super().join_group(name, host, port, rank, size, backend, timeout_s, world=world or shard)
        if shard:
            self._take_rank0_weights()
            self.trainer.engine.shard(self.group(DP_GROUP).mesh(self.trainer.device.type), self.cpu_offload)

    def start_in_step(self) -> None:
        """Every rank takes rank 0's weights (a new head's random init may differ across machines); sharded
        ranks took them before sharding (`join_group`)."""
        if not self.sharded:
            self._take_rank0_weights()

    def _take_rank0_weights(self) -> None:
        group = self.group(DP_GROUP)
        for tensor in self.trainer.model.state_dict().values():
            group.broadcast_(tensor)

    def train_step(self) -> dict[str, float]:
        return self.trainer.train_step()

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate()

    def score(self, metrics: dict[str, float]) -> float:
        return self.trainer.score(metrics)

    def state(self) -> tuple[dict, dict]:
        return self.trainer.state()

    def load_state(self, models: dict, optimizers: dict) -> None:
        self.trainer.load_state(models, optimizers)

    def weights(self) -> dict:
        return self.trainer.weights()

    def load_weights(self, state: dict, strict: bool = True) -> None:
        self.trainer.load_weights(state, strict)

    def facts(self) -> dict:
        held, total = self.trainer.engine.held_parameters()
        return {"parameters": self.trainer.num_parameters(), "skipped_steps": self.trainer.skipped_steps,
                "held": held, "total": total}

    def model_files(self) -> dict[str, bytes]:
        """The trained model as a Hugging Face folder's files, to be written where the driver runs."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.trainer.save_model(os.path.join(tmp, "model"))      # sharded: rank 0's only
            return {} if folder is None else read_folder(folder)


class DataParallelTrainer:
    """K `SupervisedLearner`s as the one trainer `train_loop` drives (see the module docstring)."""

    def __init__(self, learners: list, placement, started_ray: bool, sharded: bool = False):
        self.ranks, self.placement, self.started_ray, self.sharded = learners, placement, started_ray, sharded

    def _ask(self, method: str, *args):
        """Rank 0's answer; sharded, every rank takes part in it (the weights are gathered from all)."""
        asked = self.ranks if self.sharded else self.ranks[:1]
        return get_all([getattr(learner, method).remote(*args) for learner in asked])[0]

    def train_step(self) -> dict[str, float]:
        parts = get_all([learner.train_step.remote() for learner in self.ranks])
        return {"loss": sum(p["loss"] for p in parts)}       # each rank's share of the minibatch's loss

    def evaluate(self) -> dict[str, float]:
        return self._ask("evaluate")

    def score(self, metrics: dict[str, float]) -> float:
        return ray.get(self.ranks[0].score.remote(metrics))

    def state(self) -> tuple[dict, dict]:
        return self._ask("state")

    def load_state(self, models: dict, optimizers: dict) -> None:
        get_all([learner.load_state.remote(models, optimizers) for learner in self.ranks])

    def weights(self) -> dict:
        return self._ask("weights")

    def load_weights(self, state: dict, strict: bool = True) -> None:
        ref = ray.put(state)
        get_all([learner.load_weights.remote(ref, strict) for learner in self.ranks])

    def num_parameters(self) -> int:
        return ray.get(self.ranks[0].facts.remote())["parameters"]

    def layout(self) -> str:
        """How the ranks hold the model, for the run's first line."""
        facts = ray.get(self.ranks[0].facts.remote())
        if not self.sharded:
            return "replicated"
        return f"sharded, each holds {facts['held'] / 1e6:.2f} M of {facts['total'] / 1e6:.2f} M parameters"

    @property
    def skipped_steps(self) -> int:
        return ray.get(self.ranks[0].facts.remote())["skipped_steps"]

    def save_model(self, out_dir) -> str:
        return write_folder(self._ask("model_files"), out_dir)

    def close(self) -> None:
        for learner in self.ranks:
            ray.kill(learner)
        remove_placement_group(self.placement)
        if self.started_ray:
            ray.shutdown()


def launch_learners(build: Callable, cfg) -> DataParallelTrainer:
    """Start cfg.learners actors (cfg: a `SupervisedRunConfig`) in a placement group of their own (a local Ray
    unless one runs or $RAY_ADDRESS names a cluster), form their process group and put every rank on rank 0's
    weights. Errors while building (model path, data) surface here, before the run folder exists."""
    from actors.run import init_ray

    started_ray = init_ray()
    sharded = cfg.parallel == "shard"
    gpus = 1.0 if cfg.device == "cuda" else 0.0
    bundle = {"CPU": cfg.cpus_per_learner, **({"GPU": gpus} if gpus else {})}
    placement = None
    try:
        check_fits([("learner", bundle)] * cfg.learners, ray.cluster_resources())
        placement = placement_group([bundle] * cfg.learners, strategy="PACK")
        if not ray.wait([placement.ready()], timeout=60)[0]:
            raise ClusterTooSmall(f"placement group {[bundle] * cfg.learners} could not be reserved within 60 s; "
                                  "the cluster is busy or too fragmented")
        learners = [SupervisedLearner.options(
            num_cpus=cfg.cpus_per_learner, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=rank),
        ).remote(build, rank, cfg.learners, max(1, round(cfg.cpus_per_learner)), sharded, cfg.cpu_offload)
            for rank in range(cfg.learners)]
        ray.get([learner.__ray_ready__.remote() for learner in learners])
        connect_group(DP_GROUP, learners, resolve_backend("auto", bool(gpus)), 120.0)
        ray.get([learner.start_in_step.remote() for learner in learners])
    except BaseException:
        if placement is not None:
            remove_placement_group(placement)
        if started_ray:
            ray.shutdown()
        raise
    return DataParallelTrainer(learners, placement, started_ray, sharded)


__all__ = ["SupervisedLearner", "DataParallelTrainer", "launch_learners"]
