"""The actors on a real local Ray cluster: sharding, ordering, scoring once, weight sync."""
import pytest
import ray
import torch

from actors.driver import Trainer
from actors.pools import ClusterTooSmall, check_fits, layout, start_actors
from pipeline.config import load_config
from pipeline.data.prompt_table import read_prompt_table
from tests.rewards_for_tests import sevens

pytestmark = pytest.mark.ray


def tiny_config(task, tmp_path, *overrides):
    return load_config(None, [
        f"model.path={task['model']}", f"data.train_path={task['data']['train']}",
        f"data.eval_path={task['data']['eval']}", "data.eval_size=20",
        "rollout.prompts_per_step=6", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=4",
        "resources.rollout_workers=2", "resources.reward_scorers=2", "resources.cpus_per_rollout_worker=0.5",
        "resources.cpus_per_reward_scorer=0.25", "resources.cpus_per_learner=0.5", "resources.torch_threads=1",
        "reward.functions=[tests.rewards_for_tests:sevens]", "learner.lr=1e-2",  # a signal an untrained model gets
        f"train.output_dir={tmp_path}/run", *overrides])


@pytest.fixture(scope="module")
def pools_and_trainer(tiny_task, ray_local, tmp_path_factory):
    cfg = tiny_config(tiny_task, tmp_path_factory.mktemp("run"))
    pools = start_actors(cfg)
    pools.wait_ready()
    train = read_prompt_table(cfg.data.train_path, ("prompt", "answer"))
    evaluation = read_prompt_table(cfg.data.eval_path, ("prompt", "answer"))
    trainer = Trainer(cfg, pools, train, evaluation, tracker=None, console=None)
    yield cfg, pools, trainer
    pools.shutdown()


def test_every_prompt_gets_g_completions_in_order_scored_once(pools_and_trainer):
    cfg, pools, trainer = pools_and_trainer
    rows = trainer.sampler.next_batch()
    rollout = trainer.generate(rows)
    G = cfg.rollout.samples_per_prompt
    assert len(rollout.prompts) == len(rows) * G
    assert rollout.prompts == [r["prompt"] for r in rows for _ in range(G)]
    assert rollout.sample_index.tolist() == list(range(len(rows) * G))
    assert rollout.group_ids.tolist() == [b for b in range(len(rows)) for _ in range(G)]
    assert rollout.completion_ids.shape == rollout.logprobs.shape == rollout.completion_mask.shape
    batch, stats = trainer.score(rollout, rows)
    expected = sevens(rollout.prompts, rollout.completions)
    assert batch.scores.tolist() == pytest.approx(expected)            # each sample's own score, in order
    assert stats["reward/mean"] == pytest.approx(sum(expected) / len(expected))
    pids = ray.get([s.pid.remote() for s in pools.scorers])
    assert len(set(pids)) == 2                             # two real scorer processes


def test_generators_hold_learner_weights_after_each_sync(pools_and_trainer):
    cfg, pools, trainer = pools_and_trainer
    before = ray.get([g.weights_checksum.remote() for g in pools.generators])
    for _ in range(2):
        metrics = trainer.step()
        learner_sum = ray.get(pools.learner.export_weights.remote()).checksum
        worker_sums = ray.get([g.weights_checksum.remote() for g in pools.generators])
        assert worker_sums == [learner_sum] * len(pools.generators)
        assert metrics["policy/version"] == trainer.version
    assert worker_sums != before                           # the update changed the weights
    assert trainer.evaluate() is not None


def test_layout_that_cannot_fit_is_refused_before_start(tiny_task, tmp_path):
    cfg = tiny_config(tiny_task, tmp_path, "resources.rollout_workers=8", "resources.cpus_per_rollout_worker=1")
    with pytest.raises(ClusterTooSmall, match=r"needs 9 CPU .* cluster has 4"):
        check_fits(layout(cfg), {"CPU": 4.0})
