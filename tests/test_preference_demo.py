"""The preference demo's task and judge by hand, its pairs' noise, the KL measurement, and the demo end to end
on a small budget (SFT -> reward model -> PPO against it, scores before and after, the plot)."""
import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.demo.preference import MAX_LEN, ensemble_accuracy, make_preference_task, true_score


@pytest.mark.unit
def test_the_hidden_judge_by_hand():
    assert true_score(["abcd>", "abcd>", "abcd>", "abcd>"], ["abca", "efgh", "abcdab", "abcdabc"]) == \
        pytest.approx([4 / 6, 0.0, 1.0, 0.0])          # longer than MAX_LEN scores 0
    assert MAX_LEN == 6


@pytest.mark.unit
def test_pairs_carry_the_configured_label_noise(tmp_path):
    paths = make_preference_task(tmp_path, n_demos=10, n_pairs=4000, n_eval_pairs=10, n_prompts=10, n_eval=10,
                                 flip=0.15, seed=3)
    t = pq.read_table(paths["pairs"]).to_pydict()
    chosen, rejected = true_score(t["prompt"], t["chosen"]), true_score(t["prompt"], t["rejected"])
    agree = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert 0.83 < agree < 0.87                                    # 15% flipped, +- 2 sd at n = 4000
    assert min(abs(c - r) for c, r in zip(chosen, rejected)) >= 2 / 6 - 1e-9   # near-ties skipped
    assert set(pq.read_table(paths["demos"]).column_names) == {"prompt", "response"}


@pytest.mark.unit
def test_init_model_without_template_has_only_the_data_characters(tmp_path):
    from pipeline.runs.init_model import init_model

    paths = make_preference_task(tmp_path / "d", n_demos=20, n_pairs=20, n_eval_pairs=5, n_prompts=5, n_eval=5)
    info = init_model([paths["demos"], paths["pairs"]], tmp_path / "m", chat_template=False)
    assert info["chars"] == ">abcdefgh" and info["vocab_size"] == 4 + 9


@pytest.mark.unit
def test_demonstrations_are_better_than_chance_so_sft_can_learn_to_look_at_the_prompt(tmp_path):
    """Each demonstration letter is one of the prompt's with a probability uniform in [0.4, 1] per response:
    0.7 on average, where chance (4 of 8 letters) is 0.5 and an SFT policy learns nothing from the prompt."""
    paths = make_preference_task(tmp_path, n_demos=3000, n_pairs=10, n_eval_pairs=10, n_prompts=10, n_eval=10)
    demos = pq.read_table(paths["demos"]).to_pylist()
    inside = [ch in d["prompt"][:4] for d in demos for ch in d["response"]]
    assert 0.68 < sum(inside) / len(inside) < 0.72 and all(4 <= len(d["response"]) <= MAX_LEN for d in demos)


@pytest.mark.slow
def test_preference_demo_end_to_end_on_a_small_budget(tmp_path, capsys):
    from actors.demo import run_preference_demo

    out = tmp_path / "pref"
    results = run_preference_demo(str(out), ppo_minutes=None, ppo_steps=6, sft_steps=60, rm_steps=100,
                                  n_pairs=600, reward_models=2)
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed and "true score" in printed
    saved = json.loads((out / "preference_results.json").read_text())
    assert saved["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)      # the SFT policy against itself
    assert saved["ppo"]["kl_to_sft"] > 0 and results["ppo_steps"] == 6        # a steps budget: the same run anywhere
    assert "PPO against the reward model, 6 steps ===" in printed
    assert 0.5 < saved["reward_model_accuracy"] <= 1.0 and saved["noise_ceiling"] == 0.85
    assert len(saved["reward_model_accuracies"]) == 2 and (out / "reward_model_2" / "model").is_dir()
    # Scored the way PPO's scorers score, one model's held-out accuracy is its training run's.
    assert ensemble_accuracy([out / "reward_model" / "model"], out / "data" / "pairs_eval.parquet") == \
        pytest.approx(saved["reward_model_accuracies"][0], abs=1e-6)
    assert os.path.getsize(out / "preference_scores.png") > 10_000
    m = saved["minutes"]
    assert m["sft"] > 0 and m["sft"] + m["reward_models"] + m["ppo"] == pytest.approx(m["total"])
    assert "minutes: SFT" in printed


@pytest.mark.unit
def test_a_demo_budget_in_steps_has_no_time_limit_and_minutes_cap_either_way():
    from actors.demo import rl_budget

    assert load_config("ppo", rl_budget(None, 40)).train.steps == 40
    assert load_config("ppo", rl_budget(None, 40)).train.time_budget_s is None
    both = load_config("grpo", rl_budget(2.5, 40)).train
    assert (both.steps, both.time_budget_s) == (40, 150.0)
    assert load_config("grpo", rl_budget(10, None)).train.time_budget_s == 600.0
    with pytest.raises(ValueError, match="minutes or steps"):
        rl_budget(None, None)


@pytest.mark.unit
def test_the_arithmetic_demo_defaults_to_steps_and_a_given_budget_replaces_the_default_whole():
    from actors.demo import RL_STEPS, given_or_default

    assert given_or_default(None, None, RL_STEPS) == (None, 500)
    assert given_or_default(10.0, None, RL_STEPS) == (10.0, None)     # minutes alone: no step cap
    assert given_or_default(None, 40, RL_STEPS) == (None, 40)
    assert given_or_default(0, None, 2000) == (0, None)                # --sft-minutes 0 skips the baseline


@pytest.mark.unit
def test_the_demo_claim_rl_above_supervised_with_the_eval_noise_by_hand():
    from actors.demo import above_supervised

    # 0.964 vs 0.956 on 500 prompts: 2 * sqrt((0.964 * 0.036 + 0.956 * 0.044) / 500) = 0.02478
    holds, noise = above_supervised(0.964, 0.956, 500)
    assert holds and noise == pytest.approx(2.478, abs=1e-3)
    # 0.85 vs 0.678: 2 * sqrt((0.1275 + 0.218316) / 500) = 0.05259
    assert above_supervised(0.85, 0.678, 500) == (True, pytest.approx(5.259, abs=1e-3))
    assert above_supervised(0.5, 0.5, 500)[0] is False and above_supervised(0.49, 0.5, 500)[0] is False
