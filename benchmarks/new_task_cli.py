"""A task rlpipe never saw, from Parquet files to an RL policy by the CLI alone, and what RL adds over SFT.

The task: reverse a word of new letters ("qwer>" -> "rewq"), with the verifier in the user's own module
(`reverse_rewards.py`, in the folder the commands run from, no PYTHONPATH). The commands a user types:
`rlpipe init-model` (a tokenizer covering the data), `rlpipe sft` on 200 demonstrations, `rlpipe train` (GRPO)
on 3,000 prompts; held-out greedy exact match on 200 unseen words before and after RL.

    python benchmarks/new_task_cli.py [--out runs/new_task] [--rl-steps 250] [--sft-steps 300] [--seed 0]

tests/test_sft.py runs the same commands with a few RL steps (the pipeline, not the learning claim).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REVERSE_REWARDS = '''
def reversed_letters(prompts, completions, **_):
    """Share of positions matching the prompt's letters reversed, over the longer; 1.0 only for the reversal."""
    out = []
    for prompt, completion in zip(prompts, completions):
        target, got = prompt.rstrip(">")[::-1], completion.strip()
        out.append(sum(a == b for a, b in zip(target, got)) / max(len(target), len(got), 1))
    return out
'''


def write_task(folder: Path, seed: int = 0) -> None:
    """labelled / prompts / eval Parquet files of distinct words (200 / 3,000 / 200), and the verifier module."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng, seen = random.Random(seed), set()
    for name, n in (("labelled", 200), ("prompts", 3000), ("eval", 200)):
        words = []
        while len(words) < n:
            w = "".join(rng.choice("qwertyui") for _ in range(rng.randint(3, 5)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        pq.write_table(pa.table({"prompt": [w + ">" for w in words], "answer": [w[::-1] for w in words]}),
                       folder / f"{name}.parquet")
    (folder / "reverse_rewards.py").write_text(REVERSE_REWARDS)


def run_new_task(folder, rl_steps: int = 250, sft_steps: int = 300, seed: int = 0) -> dict:
    """The three commands in `folder` (created), on the words drawn with `seed` (the commands keep their own
    default seeds). -> {"sft_accuracy", "rl_start", "rl_end" (held-out exact match, 0..1), "outputs":
    [(command, stdout + stderr)]}. A command that fails raises with its stderr."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_task(folder, seed)
    rlpipe = str(Path(sys.executable).with_name("rlpipe"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outputs = []

    def run(*args) -> str:
        done = subprocess.run([rlpipe, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"rlpipe {args[0]} failed ({done.returncode}): {done.stderr[-3000:]}")
        outputs.append((args[0], done.stdout + done.stderr))
        return done.stdout

    run("init-model", "--data", "labelled.parquet", "prompts.parquet", "--out", "model")
    run("sft", "--model", "model", "--data", "labelled.parquet", "--eval-data", "eval.parquet", "--out", "sft",
        "--lr", "3e-3", "--batch-size", "32", "--max-steps", str(sft_steps), "--eval-every", "50", "--patience", "null")
    sft_accuracy = json.loads((folder / "sft" / "results.json").read_text())["kept_metrics"]["eval/accuracy"]
    out = run("train", "--config", "grpo", "model.path=sft/model", "data.train_path=prompts.parquet",
              "data.eval_path=eval.parquet", "data.eval_size=200", "reward.functions=[reverse_rewards:reversed_letters]",
              "rollout.max_new_tokens=7", "train.output_dir=rl", "train.time_budget_s=null", f"train.steps={rl_steps}",
              f"train.eval_every={min(50, rl_steps)}", "train.eval_every_s=null", "learner.lr=3e-4")
    done = [line for line in out.splitlines() if line.startswith("done:")][0]
    start, end = (float(x) / 100 for x in done.split("exact match ")[1].split(" (")[0].rstrip("%").split("% -> "))
    return {"sft_accuracy": sft_accuracy, "rl_start": start, "rl_end": end, "outputs": outputs}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "new_task"))
    p.add_argument("--rl-steps", type=int, default=250)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="seed of the task's words")
    args = p.parse_args(argv)
    result = run_new_task(args.out, args.rl_steps, args.sft_steps, args.seed)
    print(f"held-out exact match: SFT ({args.sft_steps} steps) {100 * result['sft_accuracy']:.1f}% -> GRPO "
          f"({args.rl_steps} steps) {100 * result['rl_end']:.1f}% ({100 * (result['rl_end'] - result['sft_accuracy']):+.1f} "
          "points)")
    return result


if __name__ == "__main__":
    main()
