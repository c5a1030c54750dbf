"""Generators and scorers that die mid-step are restarted and their shards resent: nothing lost or doubled."""
import os
import signal
import threading
import time

import pytest
import ray

from actors.driver import Trainer
from actors.pools import start_actors
from pipeline.config import load_config
from pipeline.data.prompt_table import read_prompt_table

pytestmark = pytest.mark.ray


def test_killed_generator_and_scorer_are_replaced_and_the_step_completes(tiny_task, tmp_path, ray_with_marker):
    cfg = load_config(None, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
        "data.eval_path=null", "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=32", "resources.rollout_workers=2", "resources.reward_scorers=2",
        "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_reward_scorer=0.25",
        "resources.cpus_per_learner=0.5", "resources.torch_threads=1",
        "reward.functions=[tests.rewards_for_tests:dies_once]", f"train.output_dir={tmp_path}/run"])
    pools = start_actors(cfg)
    try:
        pools.wait_ready()
        trainer = Trainer(cfg, pools, read_prompt_table(cfg.data.train_path), None, tracker=None, console=None)
        trainer.step()                                           # scorer 0 dies here, once, by os._exit
        assert ray_with_marker.exists() and trainer.resent_shards >= 1
        gen_pids = ray.get([g.pid.remote() for g in pools.generators])
        scorer_pids = ray.get([s.pid.remote() for s in pools.scorers])
        resent_before = trainer.resent_shards
        killer = threading.Thread(target=lambda: (time.sleep(0.05), os.kill(gen_pids[0], signal.SIGKILL)))
        killer.start()                                           # generator 0 killed by its process mid-step
        metrics = trainer.step()
        killer.join()
        assert trainer.resent_shards > resent_before
        assert metrics["policy/version"] == trainer.version == 2
        new_gen_pids = ray.get([g.pid.remote() for g in pools.generators])
        assert new_gen_pids[0] != gen_pids[0] and new_gen_pids[1] == gen_pids[1]
        learner_sum = ray.get(pools.learner.export_weights.remote()).checksum
        assert ray.get([g.weights_checksum.remote() for g in pools.generators]) == [learner_sum] * 2
        assert ray.get([s.pid.remote() for s in pools.scorers]) == scorer_pids   # no further deaths
        rollout = trainer.generate(trainer.sampler.next_batch())  # the restarted generator is current
        assert rollout.policy_version == trainer.version and len(rollout.prompts) == 32
    finally:
        pools.shutdown()


@ray.remote
class Producer:
    def packet(self) -> bytes:
        return b"weights"


@ray.remote(max_restarts=-1)
class Consumer:
    def take(self, packet: bytes) -> int:
        return len(packet)


def _wait_until_dead(actor, timeout_s: float) -> None:
    """ray.kill is asynchronous: a call made just after it can still run on the live actor."""
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
        except RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor still alive {timeout_s} s after ray.kill")


def test_shard_whose_input_died_with_another_actor_raises_at_once(ray_with_marker):
    """Weights exported by a learner that then died: resending cannot help, so gather must not loop until
    its deadline but raise the actor error for the run's recovery."""
    from ray.exceptions import RayActorError

    from actors.resilient import ShardCall, gather

    producer, consumer = Producer.remote(), Consumer.remote()
    ray.get([producer.__ray_ready__.remote(), consumer.__ray_ready__.remote()])
    assert gather([ShardCall(consumer, "take", (producer.packet.remote(),))]) == ([7], 0)
    ray.kill(producer)
    _wait_until_dead(producer, timeout_s=30)
    packet = producer.packet.remote()                  # holds the producer's death
    start = time.monotonic()
    with pytest.raises(RayActorError):
        gather([ShardCall(consumer, "take", (packet,))], timeout_s=20)
    assert time.monotonic() - start < 5
    assert ray.get(consumer.take.remote(b"ok")) == 2   # the consumer itself was fine all along
