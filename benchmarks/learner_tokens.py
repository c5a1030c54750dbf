"""The learner's throughput in real tokens per second at a generation-heavy shape, where completions differ in
length: a 25 M Llama (hidden 512, 8 layers, BPE), 64-token prompts, completions of up to 128 tokens, each row
cut to a length drawn uniformly from 1..128 (a random-weight model samples to the cap; RL completions do not).
One process, no Ray: one real rollout, then `--steps` updates of the preset's `PolicyLearner` on it with
micro-batches of `--micro-batch-tokens`; prints the median update seconds (the first, warm-up, left out), the
real tokens per second, and the padded tokens a full-width pass would have computed.

    python benchmarks/learner_tokens.py [--config grpo] [--steps 4] [--micro-batch-tokens 2048] [--threads 2]

A before/after of the learner's hot path: run it from two checkouts side by side, alternating (each run
imports the rlpipe of the checkout it sits in), e.g. `farm-bench` with
    cd /path/to/before && python benchmarks/learner_tokens.py
    cd /path/to/after  && python benchmarks/learner_tokens.py
The model and the rollout are built under --assets (shared by both checkouts: the same rows for both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_rollout(root: str, rows: int, prompt_tokens: int, max_new: int, seed: int):
    """The model folder and a saved rollout with its completions cut to uniform lengths (built once)."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.small_models import build_bpe_model, default_corpus

    model, saved = os.path.join(root, "model"), os.path.join(root, f"rollout-{rows}x{max_new}-s{seed}.pt")
    if not os.path.exists(os.path.join(model, "config.json")):
        build_bpe_model(model, arch="llama", hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376,
                        max_positions=256, dropout=0.0, vocab_size=2048)
    if not os.path.exists(saved):
        tok = AutoTokenizer.from_pretrained(model)
        ids = [t for row in tok(default_corpus(0, 4000), add_special_tokens=False)["input_ids"] for t in row]
        prompts = [tok.decode(ids[i * prompt_tokens:(i + 1) * prompt_tokens]) for i in range(rows)]
        cfg = load_config(None, [f"model.path={model}", f"rollout.max_new_tokens={max_new}"])
        idx = list(range(rows))
        r = RolloutGenerator(cfg.model, cfg.rollout, threads=2).generate(prompts, [i // 4 for i in idx], idx, 0)
        lengths = torch.randint(1, max_new + 1, (rows,), generator=torch.Generator().manual_seed(seed))
        keep = torch.arange(r.completion_ids.shape[1])[None] < lengths[:, None]
        r = dataclasses.replace(r, completion_mask=r.completion_mask & keep)
        torch.save(dataclasses.asdict(r), saved)
    return model, saved


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="grpo")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the completion lengths")
    p.add_argument("--assets", default=os.path.join("/tmp", "rlpipe_bench_learner_tokens"))
    args = p.parse_args(argv)

    import torch

    from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward
    from pipeline.batch import Rollout, TrainBatch
    from pipeline.config import load_config, pi_old_source
    from pipeline.trainers.ppo import PolicyLearner

    model, saved = build_rollout(args.assets, args.rows, 64, 128, args.seed)
    torch.set_num_threads(args.threads)
    rollout = Rollout(**torch.load(saved, weights_only=False))
    cfg = load_config(args.config, [f"model.path={model}", "algorithm.kl_coef=0", "data.eval_path=null",
                                    f"rollout.prompts_per_step={args.rows // 4}", "rollout.samples_per_prompt=4",
                                    "rollout.max_new_tokens=128", f"learner.minibatch_size={args.rows}",
                                    f"learner.micro_batch_tokens={args.micro_batch_tokens}"])
    a, n = cfg.algorithm, len(rollout.prompts)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1)).round()
    learner = PolicyLearner(cfg, threads=args.threads)
    seconds = []
    for _ in range(args.steps):
        rollout.policy_version = learner.version
        batch = TrainBatch(rollout=rollout, scores=scores, score_failed=torch.zeros(n, dtype=torch.bool))
        batch.pi_old = pi_old_source(cfg, n)
        out = learner.rollout_forward(rollout, old_logprobs=batch.pi_old == "learner")
        batch.values, batch.old_logprobs = out["values"], out["old_logprobs"]
        batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
            token_rewards=place_sequence_reward(scores, rollout.train_mask), mask=rollout.train_mask,
            group_ids=rollout.group_ids, values=batch.values, gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std))
        start = time.perf_counter()
        learner.update(batch)
        seconds.append(time.perf_counter() - start)
    real = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum()) * cfg.learner.epochs
    padded = n * (rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]) * cfg.learner.epochs
    median = statistics.median(seconds[1:])
    result = {"config": args.config, "rows": n, "micro_batch_tokens": args.micro_batch_tokens,
              "median_update_s": median, "real_tokens": real, "padded_tokens": padded,
              "real_tokens_per_s": real / median, "updates_s": seconds}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
