"""A simulated multi-node cluster (`ray.cluster_utils.Cluster`: a head and two more nodes, each a raylet of
its own on this machine): the placement strategy decides which node each actor runs on, and a run that
loses a node mid-run still finishes every step with a complete batch.

The driver (this process) is attached to the head, which is never removed. Nodes leave the way a crashed
machine does (`allow_graceful=False`: raylet and workers SIGKILLed), and the head's health checks are
shortened so the loss is noticed in about a second instead of ~15 s.
"""
from __future__ import annotations

import threading
import time

import mlflow
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from actors.run import run_training
from pipeline.config import load_config

pytestmark = pytest.mark.ray

# A SIGKILLed node is declared dead after ~3 missed 300 ms health checks (default: 5 x 3 s).
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                      "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


@pytest.fixture
def make_cluster():
    """`make_cluster(head_cpus)`: a head with `head_cpus` logical CPUs and two worker nodes with 2 each."""
    ray.shutdown()                     # a `ray_local` of another module must not stay attached
    started = []

    def make(head_cpus: float) -> tuple[Cluster, list]:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": False, "_system_config": FAST_HEALTH_CHECKS})
        started.append(cluster)
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        return cluster, workers

    yield make
    ray.shutdown()
    for cluster in started:
        cluster.shutdown()


@pytest.fixture(scope="class")
def shared_cluster():
    """One head with 2 CPUs and two worker nodes, shared by tests that kill no node."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def run_config(task, out, *overrides):
    return load_config("grpo", [
        f"model.path={task['model']}", f"data.train_path={task['data']['train']}",
        f"data.eval_path={task['data']['eval']}", "data.eval_size=8", f"train.output_dir={out}",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
        "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_reward_scorer=0.25",
        "resources.cpus_per_learner=0.5", "resources.torch_threads=1",
        "reward.functions=[tests.rewards_for_tests:sevens]", "train.time_budget_s=null", "train.eval_every_s=null",
        "train.log_samples_every=0", "tracking.plot=false", *overrides])


def actor_nodes(pools) -> list[tuple[str, str]]:
    """(role, node id) of every actor, in bundle order (learner, generators, scorers), asked of the actor."""
    roles = ["learner"] + ["generator"] * len(pools.generators) + ["scorer"] * len(pools.scorers)
    where = [a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for a in pools.all()]
    return list(zip(roles, ray.get(where)))


def logged_steps(summary, out, key) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], key))


class TestPlacementOnOneSharedCluster:
    """The three strategies on one cluster: no test here kills a node."""

    @pytest.mark.parametrize("strategy, gens", [("STRICT_SPREAD", 1), ("SPREAD", 2), ("PACK", 2)])
    def test_actors_land_on_nodes_as_the_placement_strategy_says(self, tiny_task, tmp_path, shared_cluster,
                                                                 strategy, gens):
        cluster, workers = shared_cluster
        all_nodes = {cluster.head_node.node_id, *(w.node_id for w in workers)}
        out = tmp_path / strategy
        cfg = run_config(tiny_task, out, f"resources.placement_strategy={strategy}",
                         f"resources.rollout_workers={gens}", "resources.reward_scorers=1", "train.steps=2",
                         "train.eval_every=2")
        seen = {}

        def on_step(step, metrics, trainer):
            if step == 1:
                table = placement_group_table(trainer.pools.placement_group)
                seen["bundles"] = [table["bundles_to_node_id"][i] for i in range(len(trainer.pools.bundles))]
                seen["actors"] = actor_nodes(trainer.pools)

        summary = run_training(cfg, address=cluster.address, overwrite=True, on_step=on_step)
        assert summary["steps"] == 2
        nodes = [node for _, node in seen["actors"]]
        assert nodes == seen["bundles"]                         # each actor runs where its bundle was reserved
        assert set(nodes) <= all_nodes
        if strategy == "STRICT_SPREAD":                         # learner, generator, scorer: one node each
            assert len(nodes) == 3 and set(nodes) == all_nodes
        elif strategy == "SPREAD":                              # 4 actors on 3 nodes: every node used
            assert set(nodes) == all_nodes
        else:                                                   # 1.75 CPUs fit on one 2-CPU node
            assert len(set(nodes)) == 1


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def wait_for(condition, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def moved_off(pools, node_id: str) -> bool:
    """True once every actor answers, from a node other than `node_id` (Ray restarted them elsewhere)."""
    try:
        return node_id not in [n for _, n in actor_nodes(pools)]
    except ray.exceptions.RayActorError:          # still restarting
        return False


class NodeLoss:
    """Kills the worker node that hosts a given role, the way a crashed machine goes (SIGKILL), and
    records what `on_step` saw at every step, replayed steps included."""

    def __init__(self, cluster, workers, cfg):
        self.cluster, self.workers = cluster, workers
        self.batch_size = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        self.steps, self.pools, self.node, self.roles, self.thread = [], [], None, [], None

    def record(self, step, metrics, trainer):
        samples = trainer.samples()
        assert len(samples) == self.batch_size                                        # the whole batch
        assert sorted(r["reward"] for r in samples) == sorted(trainer.last_batch.scores.tolist())
        assert metrics["policy/version"] == step                                     # weights never stale
        self.steps.append(step)
        self.pools.append(trainer.pools)

    def kill_node(self, trainer, with_learner: bool, in_background: bool = False) -> None:
        """Kill the worker node that hosts the learner, or the one that does not."""
        placed = actor_nodes(trainer.pools)
        learner_node = placed[0][1]
        victim = next(w for w in self.workers if (w.node_id == learner_node) == with_learner)
        self.node, self.roles = victim.node_id, [r for r, n in placed if n == victim.node_id]
        if in_background:                          # dies while the next step runs
            self.thread = threading.Thread(target=self.cluster.remove_node, args=(victim, False), daemon=True)
            self.thread.start()
        else:
            self.cluster.remove_node(victim, allow_graceful=False)

    def wait_until_declared_dead(self) -> None:
        """Block until the head's health checks declare the node dead (~1 s). Its actor processes can
        answer calls until then (the simulated node's raylet is gone, its workers not yet), so a run
        of short steps could otherwise finish before it notices anything."""
        if self.thread is not None:
            self.thread.join(timeout=30)
        wait_for(lambda: not node_alive(self.node), what="the node to be declared dead")


def final_state(trainer) -> dict:
    learner_sum = ray.get(trainer.pools.learner.export_weights.remote()).checksum
    return {"nodes": [n for _, n in actor_nodes(trainer.pools)],
            "in_sync": ray.get([g.weights_checksum.remote() for g in trainer.pools.generators])
            == [learner_sum] * len(trainer.pools.generators)}


@pytest.mark.parametrize("when", ["during_step", "restarted_between_steps"])
def test_node_with_generators_or_scorer_lost_mid_run_every_step_completes(tiny_task, tmp_path, make_cluster,
                                                                          when):
    """during_step: the node dies while a step runs; calls fail and their shards are resent.
    restarted_between_steps: the node dies between steps and Ray has restarted its actors (initial weights)
    before the next step calls them, which raises no error at all; the driver must notice anyway."""
    cluster, workers = make_cluster(head_cpus=0)  # actors only on the two worker nodes, the driver on the head
    out, steps = tmp_path / when, 5
    # A generator lost while the weights are broadcast leaves learner rank 0 waiting in the collective for its
    # whole timeout before the step falls back to the object store (120 s by default: the step's sync then takes
    # 120 s). 20 s bounds that wait here; the fallback it tests is the same.
    cfg = run_config(tiny_task, out, "resources.placement_strategy=SPREAD", "resources.rollout_workers=2",
                     "resources.reward_scorers=1", f"train.steps={steps}", "train.eval_every=3",
                     "checkpoint.every=0", "resources.collective_timeout_s=20")
    loss, end = NodeLoss(cluster, workers, cfg), {}

    def on_step(step, metrics, trainer):
        loss.record(step, metrics, trainer)
        if step == 2:                              # the node without the learner: 2 of gen, gen, scorer
            loss.kill_node(trainer, with_learner=False, in_background=when == "during_step")
            if when == "restarted_between_steps":
                loss.wait_until_declared_dead()
                wait_for(lambda: moved_off(trainer.pools, loss.node), what="Ray to restart the actors")
        if step == 3 and when == "during_step":
            loss.wait_until_declared_dead()
        if step == steps:
            end.update(final_state(trainer), resent=metrics["fault/resent_shards"])

    summary = run_training(cfg, address=cluster.address, overwrite=True, on_step=on_step)
    assert summary["steps"] == steps
    assert set(loss.roles) & {"generator", "scorer"} and "learner" not in loss.roles
    assert loss.steps == list(range(1, steps + 1))      # no step failed or was replayed
    assert len({id(p) for p in loss.pools}) == 1        # restarted in place: no recovery from a checkpoint
    assert end["resent"] > 0                            # the lost actors' shards were sent again
    assert loss.node not in end["nodes"]                # Ray restarted them on the surviving worker node
    assert end["in_sync"]                               # and the restarted generators got the current weights
    for key in ("reward/mean", "policy/version", "fault/resent_shards"):
        assert logged_steps(summary, out, key) == list(range(1, steps + 1)), key


def test_node_with_learner_lost_mid_run_recovers_from_checkpoint(tiny_task, tmp_path, make_cluster):
    cluster, workers = make_cluster(head_cpus=0)
    out, steps = tmp_path / "learner_node", 5
    cfg = run_config(tiny_task, out, "resources.placement_strategy=SPREAD", "resources.rollout_workers=2",
                     "resources.reward_scorers=1", f"train.steps={steps}", "train.eval_every=5",
                     "checkpoint.every=2", "checkpoint.recoveries=1")
    loss, end = NodeLoss(cluster, workers, cfg), {}

    def on_step(step, metrics, trainer):
        loss.record(step, metrics, trainer)
        if step == 3 and loss.node is None:
            loss.kill_node(trainer, with_learner=True)
            loss.wait_until_declared_dead()
        if step == steps:
            end.update(final_state(trainer))

    summary = run_training(cfg, address=cluster.address, overwrite=True, on_step=on_step)
    assert summary["steps"] == steps and "learner" in loss.roles
    assert len({id(p) for p in loss.pools}) == 2        # one recovery: every actor started again
    assert loss.steps == [1, 2, 3, 3, 4, 5]             # step 4 failed; the run went on from step 2's checkpoint
    assert loss.node not in end["nodes"] and end["in_sync"]
    assert logged_steps(summary, out, "reward/mean") == list(range(1, steps + 1))   # each step logged once
