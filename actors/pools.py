"""Starting the run's actors inside one placement group, sized from `ResourcesConfig`.

Every actor gets a bundle of its own (CPU/GPU shares from config), so the layout is reserved up front:
either the cluster can hold all of it and the run starts, or `ClusterTooSmall` says what is missing
before any model is loaded. A run started inside a placement group that already reserves one bundle per
actor (a Ray Tune trial's, which captures the tasks it starts) places its actors in those bundles instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.shells import Learner, Reference, RewardScorer, RolloutWorker
from pipeline.collective import DP_GROUP, resolve_backend
from pipeline.config import RunConfig, learner_reference
from pipeline.errors import UserInputError


class ClusterTooSmall(UserInputError):
    """The requested actor layout does not fit the cluster's resources."""


@dataclass
class ActorPools:
    generators: list
    scorers: list
    learners: list                    # rank 0 first: it computes values, exports and broadcasts weights
    reference: object | None
    placement_group: object | None = None
    bundles: list[dict] = field(default_factory=list)
    cfg: RunConfig | None = None

    @property
    def learner(self):
        """Learner rank 0 (it computes values, exports and broadcasts weights)."""
        return self.learners[0]

    def all(self) -> list:
        return [a for a in [*self.learners, *self.generators, *self.scorers, self.reference] if a is not None]

    def wait_ready(self) -> None:
        """Block until every actor's constructor ran (a failing one raises its error here) and the learners'
        data-parallel group formed. (The weights group is `actors.weight_sync`'s.)"""
        ray.get([a.__ray_ready__.remote() for a in self.all()])
        r = self.cfg.resources
        if len(self.learners) > 1:
            gpu = self.cfg.model.device != "cpu" and r.gpus_per_learner > 0
            connect_group(DP_GROUP, self.learners, resolve_backend(r.collective_backend, gpu), r.collective_timeout_s)

    def shutdown(self) -> None:
        for actor in self.all():
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


def connect_group(name: str, members: list, backend: str, timeout_s: float) -> None:
    """Form process group `name` over actor handles `members` (rank = position): rank 0 opens the store,
    then all join at once (each join blocks until every member arrived)."""
    host, port = ray.get(members[0].open_store.remote(name, len(members), timeout_s))
    ray.get([m.join_group.remote(name, host, port, rank, len(members), backend, timeout_s)
             for rank, m in enumerate(members)])


def layout(cfg: RunConfig) -> list[tuple[str, dict]]:
    """(role, bundle) per actor, in start order."""
    r = cfg.resources

    def bundle(cpus: float, gpus: float = 0.0) -> dict:
        b = {"CPU": cpus}
        if gpus:
            b["GPU"] = gpus
        return b

    roles = [("learner", bundle(r.cpus_per_learner, r.gpus_per_learner))] * r.learners
    roles += [("generator", bundle(r.cpus_per_rollout_worker, r.gpus_per_rollout_worker))] * r.rollout_workers
    roles += [("scorer", bundle(r.cpus_per_reward_scorer, r.gpus_per_reward_scorer))] * r.reward_scorers
    if cfg.algorithm.kl_coef > 0 and not learner_reference(cfg):     # a LoRA run's reference is its base
        roles += [("reference", bundle(r.cpus_per_reference, r.gpus_per_learner and min(r.gpus_per_learner, 1.0)))]
    return roles


def check_fits(roles: list[tuple[str, dict]], available: dict[str, float]) -> None:
    """Raise ClusterTooSmall naming the resource, what the layout needs and what the cluster has."""
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for _, b in roles)
        have = available.get(resource, 0.0)
        if need > have + 1e-9:
            parts = ", ".join(f"{role} {b.get(resource, 0.0):g}" for role, b in roles if b.get(resource))
            raise ClusterTooSmall(
                f"the actor layout needs {need:g} {resource} ({parts}) but the cluster has {have:g}; lower the "
                f"resources.*_per_* shares or the worker counts, or add nodes")


def start_actors(cfg: RunConfig) -> ActorPools:
    """Start all actors: in a placement group of their own, or in the caller's when it runs inside one
    (a Tune trial's), one bundle per actor."""
    roles = layout(cfg)
    check_fits(roles, ray.cluster_resources())
    pg = None
    if get_current_placement_group() is None:
        pg = placement_group([b for _, b in roles], strategy=cfg.resources.placement_strategy)
        ready, _ = ray.wait([pg.ready()], timeout=60)
        if not ready:
            remove_placement_group(pg)
            raise ClusterTooSmall(f"placement group {[b for _, b in roles]} ({cfg.resources.placement_strategy}) "
                                  "could not be reserved within 60 s; the cluster is busy or too fragmented")
    target, first = pg, 0
    if pg is None and get_current_placement_group() is not None:
        # Inside a Tune trial: pin each actor to its own bundle of the trial's group (its last len(roles)
        # bundles; the first is the trial driver's). Left to "any bundle", a small actor can take a big
        # bundle and leave a bigger actor nowhere to go, which waits forever.
        target = get_current_placement_group()
        first = len(target.bundle_specs) - len(roles)
        mine = target.bundle_specs[first:] if first >= 0 else []
        if len(mine) != len(roles) or any(m.get(k, 0.0) + 1e-9 < v for m, (_, b) in zip(mine, roles)
                                          for k, v in b.items()):
            raise ClusterTooSmall(f"the caller's placement group {target.bundle_specs} has no bundle per actor "
                                  f"for the layout {[b for _, b in roles]}; build it from actors.pools.layout(cfg)")
    r = cfg.resources

    def options(i: int, bundle: dict, restartable: bool = False) -> dict:
        opts = {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)}
        if restartable:   # Ray restarts it; the driver restores its state and resends the shard
            opts["max_restarts"] = -1
        if target is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                target, placement_group_bundle_index=first + i)
        return opts

    def threads(share: float) -> int:
        return r.torch_threads or max(1, round(share))

    reference = None
    learners, generators, scorers = [], [], []
    for i, (role, b) in enumerate(roles):
        if role == "learner":
            learners.append(Learner.options(**options(i, b)).remote(cfg, threads(b["CPU"]), len(learners),
                                                                     r.learners))
        elif role == "generator":
            generators.append(RolloutWorker.options(**options(i, b, restartable=True)).remote(
                cfg.model, cfg.rollout, cfg.data.chat_template, len(generators), cfg.train.seed, threads(b["CPU"]),
                cfg.vllm, cfg.env))
        elif role == "scorer":
            scorers.append(RewardScorer.options(**options(i, b, restartable=True)).remote(
                cfg.reward.functions, cfg.reward.weights, cfg.reward.failed_reward, cfg.reward.models,
                "cuda" if b.get("GPU") else "cpu", threads(b["CPU"])))
        else:
            reference = Reference.options(**options(i, b)).remote(cfg.model, cfg.rollout.temperature,
                                                                 threads(b["CPU"]))
    return ActorPools(generators, scorers, learners, reference, pg, [b for _, b in roles], cfg)
