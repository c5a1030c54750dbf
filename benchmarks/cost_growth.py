"""How a step's cost grows as its work grows: seconds of each stage (generation, scoring, learner update, weight
sync) against the rows of a step (B x G), the completion length and the model size, measured on rlpipe's own
plain classes in one process (no Ray: the stages' own cost, not the hops between actors), then the log-log
slope of each stage in each sweep, each stage's share of the step, and a log-log plot.

    python benchmarks/cost_growth.py [--out runs/cost_growth] [--threads 2] [--sweeps rows,length,size]

Each point: a Llama built here with random weights (sampling runs to the length cap on nearly every row: an
EOS is 1 in 2,048 tokens), 32-token prompts, one warm-up step, then the median of `--repeats` timed steps.
A step is
  generation  `RolloutGenerator.generate` (hf) of rows x length tokens;
  scoring     the `arithmetic` rule reward on the decoded completions;
  update      `PolicyLearner.update` (GRPO, one optimizer step over the rows);
  sync        `export_weights` -> `set_weights`: the object-store path with both checksums.
The baseline point is 16 rows, 32 tokens and the 13 M model; each sweep moves one of the three.
Writes cost_growth.json, cost_growth.md and cost_growth.png to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = ("generation", "scoring", "update", "sync")
# name -> (hidden, layers, MLP) of the Llama the project builds (vocabulary 2,048)
SIZES = {"0.8M": (128, 4, 344), "3M": (256, 4, 688), "13M": (512, 4, 1376), "50M": (768, 8, 2048),
         "100M": (1024, 8, 2752)}
BASE = {"rows": 16, "length": 32, "size": "13M"}
SWEEPS = {"rows": [4, 8, 16, 32, 64], "length": [8, 16, 32, 64, 128], "size": list(SIZES)}


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of log y against log x: the exponent k of y ~ x^k."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def build_model(root: str, size: str) -> str:
    from pipeline.small_models import build_bpe_model

    path = os.path.join(root, size)
    if not os.path.exists(os.path.join(path, "config.json")):
        hidden, layers, mlp = SIZES[size]
        build_bpe_model(path, arch="llama", hidden_size=hidden, num_layers=layers, num_heads=max(2, hidden // 64),
                        intermediate_size=mlp, max_positions=256, dropout=0.0, vocab_size=2048)
    return path


def measure(root: str, rows: int, length: int, size: str, repeats: int, threads: int) -> dict:
    """Median seconds of each stage at one point, and the model's parameters."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward
    from pipeline.batch import TrainBatch
    from pipeline.config import load_config
    from pipeline.rewards.functions import resolve_reward_fn
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.small_models import default_corpus
    from pipeline.trainers.ppo import PolicyLearner

    path = build_model(root, size)
    tok = AutoTokenizer.from_pretrained(path)
    ids = [t for row in tok(default_corpus(0, 2000), add_special_tokens=False)["input_ids"] for t in row]
    prompts = [tok.decode(ids[i * 32:(i + 1) * 32]) for i in range(rows)]
    cfg = load_config("grpo", [f"model.path={path}", "algorithm.kl_coef=0", "data.eval_path=null",
                               f"rollout.prompts_per_step={max(1, rows // 4)}", "rollout.samples_per_prompt=4",
                               f"rollout.max_new_tokens={length}", f"learner.minibatch_size={rows}"])
    gen = RolloutGenerator(cfg.model, cfg.rollout, threads=threads)
    learner = PolicyLearner(cfg, threads=threads)
    reward = resolve_reward_fn("arithmetic")
    idx = list(range(rows))
    a = cfg.algorithm
    times = {s: [] for s in STAGES}
    for step in range(repeats + 1):                      # the first is the warm-up
        t0 = time.perf_counter()
        r = gen.generate(prompts, [i // 4 for i in idx], idx, step)
        t1 = time.perf_counter()
        scores = torch.tensor([s if s is not None else 0.0 for s in reward(r.prompts, r.completions)])
        t2 = time.perf_counter()
        r.policy_version = learner.version
        batch = TrainBatch(rollout=r, scores=scores, score_failed=torch.zeros(rows, dtype=torch.bool))
        batch.pi_old = "sampler"
        batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
            token_rewards=place_sequence_reward(scores + torch.rand(rows), r.train_mask), mask=r.train_mask,
            group_ids=r.group_ids, values=None, gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std))
        learner.update(batch)
        t3 = time.perf_counter()
        gen.set_weights(learner.export_weights())
        t4 = time.perf_counter()
        if step:
            for s, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[s].append(dt)
    parameters = sum(p.numel() for p in learner.policy.model.parameters())
    point = {"rows": rows, "length": length, "size": size, "parameters": parameters,
             **{s: statistics.median(v) for s, v in times.items()}}
    point["step"] = sum(point[s] for s in STAGES)
    return point


def x_of(sweep: str, point: dict) -> float:
    return point["parameters"] if sweep == "size" else point[sweep]


def report(results: dict) -> str:
    from pipeline.plots import markdown_table

    out = []
    for sweep, points in results["sweeps"].items():
        head = [{"rows": "rows (B x G)", "length": "completion tokens", "size": "parameters"}[sweep],
                *[f"{s} s" for s in STAGES], "step s", "shares: gen / score / update / sync"]
        lines = []
        for p in points:
            x = f"{p['parameters'] / 1e6:.1f} M" if sweep == "size" else p[sweep]
            lines.append([x, *[f"{p[s]:.3f}" for s in STAGES], f"{p['step']:.2f}",
                          " / ".join(f"{p[s] / p['step']:.0%}" for s in STAGES)])
        k = results["slopes"][sweep]
        lines.append(["log-log slope", *[f"{k[s]:+.2f}" for s in STAGES], f"{k['step']:+.2f}", ""])
        out += [f"Sweep of {sweep} (the rest at {', '.join(f'{n} {v}' for n, v in BASE.items() if n != sweep)}):",
                "", markdown_table(head, lines), ""]
    return "\n".join(out)


def plot(results: dict, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results["sweeps"]), figsize=(5 * len(results["sweeps"]), 4), squeeze=False)
    labels = {"rows": "rows per step (B x G)", "length": "completion tokens", "size": "parameters"}
    for ax, (sweep, points) in zip(axes[0], results["sweeps"].items()):
        xs = [x_of(sweep, p) for p in points]
        for s in (*STAGES, "step"):
            ax.plot(xs, [max(p[s], 1e-5) for p in points], marker="o", label=s,
                    linewidth=2.5 if s == "step" else 1.5, color="black" if s == "step" else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if sweep != "size":                        # the swept values themselves, not 2 x 10^1
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(labels[sweep])
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Seconds per stage as the work grows (2-core CPU, one process)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "cost_growth"))
    p.add_argument("--sweeps", default="rows,length,size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--assets", default=os.path.join(tempfile.gettempdir(), "rlpipe_cost_growth"))
    p.add_argument("--sizes", default=",".join(SIZES), help="the size sweep's models, of " + ", ".join(SIZES))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sweeps = {"rows": SWEEPS["rows"], "length": SWEEPS["length"], "size": args.sizes.split(",")}
    results = {"base": BASE, "threads": args.threads, "sweeps": {}, "slopes": {}}
    for sweep in args.sweeps.split(","):
        points = []
        for value in sweeps[sweep]:
            at = {**BASE, sweep: value}
            points.append(measure(args.assets, at["rows"], at["length"], at["size"], args.repeats, args.threads))
            print(json.dumps(points[-1]), flush=True)
        results["sweeps"][sweep] = points
        xs = [x_of(sweep, q) for q in points]
        results["slopes"][sweep] = {s: slope(xs, [max(q[s], 1e-6) for q in points]) for s in (*STAGES, "step")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost_growth.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    text = report(results)
    with open(os.path.join(args.out, "cost_growth.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"plot: {plot(results, os.path.join(args.out, 'cost_growth.png'))}")
    return results


if __name__ == "__main__":
    main()
