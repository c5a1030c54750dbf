"""End to end through `rlpipe train`: learning, recovery from a lost learner, failing rewards, bad input writes
nothing. The runs share one local Ray (`ray_local`, a module fixture): nothing here kills a node."""
import os

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from actors.cli import main
from actors.run import run_training
from pipeline.config import load_config



def run_args(task, out, *extra):
    return [f"model.path={task['model']}", f"data.train_path={task['data']['train']}",
            f"data.eval_path={task['data']['eval']}", "data.eval_size=20", f"train.output_dir={out}",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
            "resources.num_cpus=2", "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
            "resources.torch_threads=1", "train.log_samples_every=2", *extra]


@pytest.mark.slow
def test_reward_rises_params_change_and_workers_sync(tiny_task, tmp_path, ray_local):
    """Also: a held-out file without an `answer` column is evaluated by the reward functions (k sampled
    completions per prompt), and the held-out mean reward rises with the training reward."""
    import pyarrow.parquet as pq

    out = tmp_path / "learn"
    prompts_only = tmp_path / "eval_prompts.parquet"
    pq.write_table(pq.read_table(tiny_task["data"]["eval"], columns=["prompt"]), prompts_only)
    cfg = load_config("grpo", run_args(tiny_task, out, "reward.functions=[tests.rewards_for_tests:sevens]",
                                       "learner.lr=1e-2", "train.steps=15", "train.time_budget_s=null",
                                       "train.eval_every=5", "checkpoint.every=0", f"data.eval_path={prompts_only}",
                                       "env.eval_samples=2"))
    synced = []

    def on_step(step, metrics, trainer):
        import ray
        from pipeline.weights import checksum_arrays  # noqa: F401
        learner_sum = ray.get(trainer.pools.learner.export_weights.remote()).checksum
        synced.append(ray.get([g.weights_checksum.remote() for g in trainer.pools.generators]) == [learner_sum])

    summary = run_training(cfg, on_step=on_step)
    assert summary["steps"] == 15 and all(synced) and len(synced) == 15
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    rewards = [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], "reward/mean"),
                                       key=lambda m: m.step)]
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3 + 0.05, rewards
    held_out = sorted(client.get_metric_history(summary["mlflow_run_id"], "eval/mean_reward"), key=lambda m: m.step)
    assert [m.step for m in held_out] == [0, 5, 10, 15] and held_out[-1].value > held_out[0].value + 0.05, held_out
    assert summary["final_accuracy"] is not None      # the headline figure is eval/success here
    before = load_file(os.path.join(tiny_task["model"], "model.safetensors"))
    after = load_file(os.path.join(summary["final_model"], "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"config.yaml", "curves.png", "final_model", "samples"} <= artifacts


class Crash(RuntimeError):
    pass


@pytest.mark.unit      # every case stops in the checks before Ray starts
@pytest.mark.parametrize("case, fragment", [
    ("unknown_field", "unknown config field algorithm.clip_rang"),
    ("missing_file", "no_such.parquet"),
    ("missing_column", "prompt"),
    ("not_a_model", "is not a Hugging Face model folder"),
    ("bad_reward", "cannot import module 'no_such_module'"),
    ("too_long", "but the model has 64"),
    ("int_prompts", "prompt 0 is neither text nor a list of {role, content} messages: 12"),
    ("eval_by_reward_lacks_column", "lacks column(s) answer"),     # exact_match reads it
])
def test_bad_input_one_clear_error_and_no_run_dir(tiny_task, tmp_path, capsys, case, fragment):
    out = tmp_path / "bad"
    args = run_args(tiny_task, out)
    if case == "unknown_field":
        args.append("algorithm.clip_rang=0.1")
    elif case == "missing_file":
        args.append(f"data.train_path={tmp_path}/no_such.parquet")
    elif case == "missing_column":
        args.append(f"data.prompt_column=question")
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        args.append(f"model.path={tmp_path}/empty")
    elif case == "too_long":     # 60 characters + <bos> + 6 new tokens > the tiny model's 64 positions
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": ["1+2=", "1" * 60 + "+2="], "answer": ["3", "3"]}), tmp_path / "long.parquet")
        args.append(f"data.train_path={tmp_path}/long.parquet")
    elif case == "int_prompts":  # used to be a transformers traceback and a half-made run directory
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": [12, 13], "answer": ["3", "3"]}), tmp_path / "ints.parquet")
        args.append(f"data.train_path={tmp_path}/ints.parquet")
    elif case == "eval_by_reward_lacks_column":     # no answer: evaluated by the reward functions, which need one
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": ["1+2=", "3+4="]}), tmp_path / "no_answers.parquet")
        args.append(f"data.eval_path={tmp_path}/no_answers.parquet")
    else:
        args.append("reward.functions=[no_such_module:score]")
    assert main(["train", "--config", "grpo", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("on_failure", ["score", "drop"])
def test_reward_that_raises_on_a_sample_is_counted_and_run_goes_on(tiny_task, tmp_path, ray_local, on_failure):
    out = tmp_path / "flaky"
    cfg = load_config("grpo", run_args(tiny_task, out, "reward.functions=[tests.rewards_for_tests:flaky]", "train.steps=2",
                                       "train.eval_every=2", f"reward.on_failure={on_failure}"))
    summary = run_training(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    failed = sum(m.value for m in client.get_metric_history(summary["mlflow_run_id"], "reward/failed"))
    dropped = sum(m.value for m in client.get_metric_history(summary["mlflow_run_id"], "reward/dropped"))
    assert summary["steps"] == 2 and failed > 0
    assert dropped == (failed if on_failure == "drop" else 0)


@pytest.mark.slow
def test_a_reward_that_always_fails_is_reported_and_stops_the_run(tiny_task, tmp_path, capsys, ray_local):
    """A function that returns text for every sample: the step line shows the failures, its first failure is
    printed once, and the run stops with one clear error after reward.max_failed_steps steps."""
    out = tmp_path / "wordy_run"
    args = run_args(tiny_task, out, "reward.functions=[tests.rewards_for_tests:wordy]", "train.steps=10", "reward.max_failed_steps=2",
                    "train.eval_every=100")
    assert main(["train", "--config", "grpo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("tests.rewards_for_tests:wordy first failed with: returned 'great', not a finite number") == 1
    assert "| failed 32 |" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("rlpipe train: error:")]
    assert len(errors) == 1 and "every sample's reward failed for 2 steps in a row" in errors[0], captured.err[-2000:]
    assert "tests.rewards_for_tests:wordy: returned 'great'" in errors[0]


@pytest.mark.slow
def test_lost_learner_resumes_from_checkpoint_by_itself(tiny_task, tmp_path, ray_local):
    import signal

    import ray

    out = tmp_path / "lost"
    cfg = load_config("grpo", run_args(tiny_task, out, "train.steps=5", "train.eval_every=5", "checkpoint.every=2"))
    killed = []

    def kill_learner_at_3(step, metrics, trainer):
        if step == 3 and not killed:
            killed.append(ray.get(trainer.pools.learner.pid.remote()))
            os.kill(killed[0], signal.SIGKILL)

    summary = run_training(cfg, on_step=kill_learner_at_3)
    assert killed and summary["steps"] == 5
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "reward/mean")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
