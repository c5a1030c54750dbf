"""Data-parallel learners of the supervised commands (`--learners 2`): two Ray actors take the step one learner
takes, for SFT and for reward models; early stopping (a decision the driver makes for all ranks) keeps the
same best weights; the CLI runs them."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from actors.cli import main
from actors.supervised import launch_learners
from pipeline.runs.supervised import RewardModelConfig, SFTConfig, run_reward_model, run_sft


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    """atol 1e-5, as the PPO learners' parity test: AdamW divides each element's gradient by its own scale, so
    an element whose gradient is near zero turns the all-reduce's float order into a visible difference (seen:
    1 of 2,048 reward-model weights off by 1.9e-6 after 3 steps on one machine, none on another)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def ray_two_cpus():
    """A local Ray of 2 CPUs the test ends (the CLI test below checks that its own Ray ends with the command)."""
    import os

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("parallel", ["replicate", "shard"])
def test_two_sft_learners_take_one_learners_steps_and_stop_alike(tiny_task, tmp_path, ray_two_cpus, parallel):
    """Sharded (FSDP2, 1/2 of the weights each), every rank also takes part in each evaluation, each best-weights
    snapshot and its restore at the early stop, and the saved model."""
    # batch 15 over 2 ranks: shares of 8 and 7 rows, so a wrong weighting of the shares shows.
    common = dict(model=tiny_task["model"], data=tiny_task["data"]["labelled"], eval_size=20, lr=3e-3,
                  batch_size=15, max_steps=6, eval_every=2, patience=1, checkpoint_every=100)
    one = run_sft(SFTConfig(out=str(tmp_path / "one"), **common), log=lambda _: None)
    lines = []
    two = run_sft(SFTConfig(out=str(tmp_path / "two"), learners=2, parallel=parallel, **common), log=lines.append,
                  launch=launch_learners)
    layout = "sharded, each holds" if parallel == "shard" else "(replicated)"
    assert layout in lines[0], lines[0]
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert two["steps"] == one["steps"] and two["best_step"] == one["best_step"]
    for (s1, _, m1), (s2, _, m2) in zip(one["curve"], two["curve"]):
        assert s1 == s2 and m1["eval/loss"] == pytest.approx(m2["eval/loss"], rel=1e-4)
        if "train/loss" in m1:      # the ranks' loss shares add up to the minibatch's loss
            assert m1["train/loss"] == pytest.approx(m2["train/loss"], rel=1e-4)


@pytest.mark.ray
@pytest.mark.parametrize("parallel", ["replicate", "shard"])
def test_two_reward_model_learners_take_one_learners_steps(tiny_task, tmp_path, ray_two_cpus, parallel):
    rows = [(f"{a}+{b}=", str(a + b), str(a + b + 1 + (a % 3))) for a in range(10, 40) for b in range(10, 14)]
    prompts, chosen, rejected = zip(*rows)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)}), pairs)
    common = dict(model=tiny_task["model"], data=str(pairs), eval_size=20, lr=1e-3, batch_size=9, max_steps=3,
                  eval_every=3, patience=None)
    run_reward_model(RewardModelConfig(out=str(tmp_path / "one"), **common), log=lambda _: None)
    run_reward_model(RewardModelConfig(out=str(tmp_path / "two"), learners=2, parallel=parallel, **common),
                     log=lambda _: None, launch=launch_learners)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))


@pytest.mark.unit
def test_learners_above_one_need_a_launcher(tiny_task, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="learners=2 needs Ray"):
        run_sft(SFTConfig(model=tiny_task["model"], data=tiny_task["data"]["labelled"], out=str(tmp_path / "r"),
                          eval_size=20, learners=2, max_steps=1), log=lambda _: None)
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
def test_sft_cli_with_two_learners_and_resume(tiny_task, tmp_path, capsys):
    """`rlpipe sft --learners 2` starts (and ends) its own local Ray; a resumed run continues the curve."""
    import ray

    out = tmp_path / "dp"
    flags = ["sft", "--model", tiny_task["model"], "--data", tiny_task["data"]["labelled"], "--out", str(out),
             "--learners", "2", "--batch-size", "16", "--eval-every", "5", "--patience", "null",
             "--checkpoint-every", "5", "--eval-size", "20", "--lr", "3e-3"]
    assert main([*flags, "--max-steps", "5"]) == 0
    assert "x 2 data-parallel learners" in capsys.readouterr().out
    assert not ray.is_initialized()
    assert main(["sft", "--resume", str(out), "--max-steps", "10"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [s for s, _, _ in result["curve"]] == [0, 5, 10] and result["steps"] == 10
