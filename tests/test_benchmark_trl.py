"""benchmarks/trl_side_by_side.py: the TRL side on a tiny task (skipped without TRL)."""
import argparse
import importlib.util
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "trl_side_by_side.py")


def load_bench():
    spec = importlib.util.spec_from_file_location("trl_side_by_side", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_trl_side_trains_within_budget_and_matches_the_batch(tiny_task, tmp_path):
    pytest.importorskip("trl")
    bench = load_bench()
    data_dir = os.path.dirname(tiny_task["data"]["train"])
    args = argparse.Namespace(warm=tiny_task["model"], data=data_dir, minutes=0.1, prompts_per_step=4,
                              samples_per_prompt=4, max_new_tokens=4, lr=1e-3, eval_size=20, eval_every_s=2,
                              out=str(tmp_path))
    result = bench.run_trl(args)
    config = result["config"]
    assert config["generation_batch_size"] == 16 and config["num_generations"] == 4
    assert config["loss_type"] == "dapo" and config["beta"] == 0.0 and not config["bf16"]
    assert result["steps"] == len(result["step_s"]) == len(result["reward"]) >= 1
    assert 6 <= result["elapsed_s"] < 6 + 3 * max(result["step_s"]) + 10     # stopped after the budget
    assert result["curve"][0][0] == 0.0 and result["curve"][-1][0] == pytest.approx(result["elapsed_s"], abs=0.1)
