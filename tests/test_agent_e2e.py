"""A user's environment as `module:Class` in the working directory, trained and evaluated through `rlpipe train` alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.ray

USER_ENV = '''
class Sevens:
    """Two turns: each pays 1 when the turn holds a 7; the model sees how many 7s it wrote so far."""

    stop = ["="]

    def reset(self, row, seed):
        self.sevens = 0
        return row["prompt"]

    def step(self, action):
        self.sevens += action.count("7")
        done = getattr(self, "turns", 0) == 1
        self.turns = getattr(self, "turns", 0) + 1
        return (f" {self.sevens} ", float("7" in action), done, False, {"tool_calls": 1})
'''


def test_a_user_environment_from_the_working_directory_trains_through_the_cli(tiny_task, tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    out = tmp_path / "run"
    rlpipe = str(Path(sys.executable).with_name("rlpipe"))
    args = [f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
            f"data.eval_path={tiny_task['data']['eval']}", "data.eval_size=8", "env.eval_samples=2",
            f"train.output_dir={out}", "train.steps=3", "checkpoint.every=0",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8",
            "env.name=my_env:Sevens", "env.max_turns=3", "env.max_episode_tokens=40", "env.truncated_reward=keep",
            "resources.num_cpus=2", "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
            "resources.torch_threads=1", "learner.lr=1e-2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}     # a user's shell: nothing but the cwd
    done = subprocess.run([rlpipe, "train", "--config", "grpo", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rlpipe").experiment_id])
    metrics = run.data.metrics
    assert 1.0 <= metrics["env/turns"] <= 3.0 and metrics["env/tool_calls"] > 0
    shares = [v for k, v in metrics.items() if k.startswith("env/stop/")]
    assert len(shares) == 6 and abs(sum(shares) - 1.0) < 1e-6
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "policy/loss")) == [1, 2, 3]
    # held-out episodes by reward, before RL and at the end: success, pass@2, mean reward
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/success")) == [0, 3]
    assert 0.0 <= metrics["eval/success"] <= metrics["eval/pass_at_2"] <= 1.0 and "eval/mean_reward" in metrics
    assert "held-out episode success" in done.stdout
    before = load_file(os.path.join(tiny_task["model"], "model.safetensors"))
    after = load_file(os.path.join(out, "final_model", "model.safetensors")) \
        if (out / "final_model").exists() else None
    assert after is not None, sorted(os.listdir(out))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_generator_killed_by_its_environment_mid_step_regenerates_its_episodes(tiny_task, tmp_path, ray_with_marker):
    """The environments of a generator die with it (here one ends the process at its first step): Ray restarts
    the generator, the driver resends its shard, and each step still trains every episode exactly once, none a
    placeholder (asynchronous rollouts, so a batch is in flight when it happens)."""
    import ray

    from actors.driver import Trainer
    from actors.pools import start_actors
    from pipeline.config import load_config
    from pipeline.data.prompt_table import read_prompt_table

    cfg = load_config(None, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}", "data.eval_path=null",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=8",
        "env.name=tests.rewards_for_tests:DiesOnceEnv", "env.max_turns=3", "env.max_episode_tokens=40",
        "resources.rollout_workers=2", "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
        "resources.torch_threads=1", f"train.output_dir={tmp_path}/run", "rollout.max_staleness=1",
        "algorithm.old_logprobs=learner", "algorithm.tis_cap=2.0"])
    pools = start_actors(cfg)
    try:
        pools.wait_ready()
        pids = ray.get([g.pid.remote() for g in pools.generators])
        trainer = Trainer(cfg, pools, read_prompt_table(cfg.data.train_path), None, tracker=None, console=None)
        trained = [trainer.step() for _ in range(3)]
        assert ray_with_marker.exists() and trainer.resent_shards >= 1
        assert ray.get([g.pid.remote() for g in pools.generators]) != pids        # one was restarted
        for m in trained:
            assert m["reward/failed"] == 0 and m["env/stop/env_error"] == 0 and m["env/stop/timeout"] == 0
        r = trainer.last_batch.rollout
        assert r.sample_index.tolist() == list(range(12)) and len(r.stop_reasons) == 12
        assert trainer.version == 3 and all(m["policy/staleness"] <= 1 for m in trained)
    finally:
        pools.shutdown()
