"""Seconds of one learner update on the demo's model shape (a 0.8 M Llama, character tokenizer, 3-digit addition
prompts), in one process without Ray: one real rollout of the preset's batch, then `--steps` updates of its
PolicyLearner; prints the median update seconds (the first update, warm-up, left out).

    python benchmarks/learner_update.py --config grpo [--steps 12]

For a before/after of the learner's hot path, run it from two checkouts side by side, alternating, each from
its own folder (the script puts its own checkout first on sys.path, ahead of PYTHONPATH), e.g.
    cd /path/to/before && python benchmarks/learner_update.py --config ppo
    cd /path/to/after  && python benchmarks/learner_update.py --config ppo
The model and data are built (untrained: the update's cost does not depend on the weights) under --assets.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="grpo")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--assets", default=os.path.join("runs", "bench_learner_update"))
    args = p.parse_args(argv)

    import torch

    from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward
    from pipeline.batch import TrainBatch
    from pipeline.config import load_config
    from pipeline.data.prompt_table import PromptSampler, read_prompt_table
    from pipeline.demo.task import make_arithmetic_task
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.small_models import build_tiny_model
    from pipeline.trainers.ppo import PolicyLearner

    torch.set_num_threads(1)
    root = args.assets
    if not os.path.exists(os.path.join(root, "model", "config.json")):
        make_arithmetic_task(os.path.join(root, "data"), digits=3, n_labelled=200, n_rl=2000, n_eval=100, seed=0)
        build_tiny_model(os.path.join(root, "model"), hidden_size=128, num_layers=4, num_heads=4,
                         intermediate_size=344, seed=0)     # the demo's shape
    cfg = load_config(args.config, [f"model.path={root}/model", f"data.train_path={root}/data/train.parquet",
                                    "algorithm.kl_coef=0", "data.eval_path=null"])
    G, a = cfg.rollout.samples_per_prompt, cfg.algorithm
    rows = PromptSampler(read_prompt_table(cfg.data.train_path), cfg.rollout.prompts_per_step, 0).next_batch()
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    groups = [b for b in range(len(rows)) for _ in range(G)]
    rollout = RolloutGenerator(cfg.model, cfg.rollout).generate(prompts, groups, list(range(len(prompts))), 0)
    scores = torch.rand(len(prompts), generator=torch.Generator().manual_seed(1)).round()
    learner = PolicyLearner(cfg)
    seconds = []
    for version in range(args.steps):
        batch = TrainBatch(rollout=rollout, scores=scores, score_failed=torch.zeros(len(prompts), dtype=torch.bool))
        rollout.policy_version = version
        batch.values = learner.rollout_forward(rollout)["values"]
        batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
            token_rewards=place_sequence_reward(scores, rollout.completion_mask), mask=rollout.completion_mask,
            group_ids=rollout.group_ids, values=batch.values, gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std))
        start = time.perf_counter()
        learner.update(batch)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[1:])
    print(f"{args.config}: learner update median {median:.4f} s over {args.steps - 1} updates "
          f"({len(prompts)} sequences)")
    return median


if __name__ == "__main__":
    main()
