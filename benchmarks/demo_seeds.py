"""The arithmetic demo per seed: the README's table, reproducible by one command.

For each seed, `rlpipe demo --seed S` with its default budgets in steps (warm start, GRPO, PPO, continued
supervised training), into <out>/s<S>; a seed whose `demo_results.json` exists is read, not rerun. Prints a
markdown table (final held-out exact match of each stage, RL minus supervised with the eval's noise, the share
of the warm start's remaining errors removed), means and ranges, and the verdict of the demo's claim (each RL
preset ends above continued supervised training) per seed; plots the finals per seed to <out>/demo_seeds.png.

    python benchmarks/demo_seeds.py --seeds 0,1,2,3,4 --out runs/seeds       # ~30 min per seed on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(seed: int, r: dict) -> dict:
    from actors.demo import above_supervised

    warm, sft = r["warm_start_plateau"], r.get("sft", {}).get("final_accuracy")
    out = {"seed": seed, "warm start": warm, "supervised": sft}
    for algo, rl in r["rl"].items():
        out[algo] = rl["final_accuracy"]
        out[f"{algo} best"] = rl["best_accuracy"]
        out[f"{algo} s/step"] = rl["elapsed_s"] / rl["steps"]
        if sft is not None:
            holds, noise = above_supervised(rl["final_accuracy"], sft, r.get("eval_prompts", 500))
            out[f"{algo} - supervised"] = (100 * (rl["final_accuracy"] - sft), noise, holds)
    return out


def removed(warm: float, acc: float) -> str:
    return f"{(acc - warm) / (1 - warm):+.0%}" if 1 - warm > 1e-9 else "n/a"


def table(rows: list[dict], algos: list[str]) -> str:
    from pipeline.plots import markdown_table

    head = ["seed", "warm start", "+ supervised"] + [f"+ {a.upper()}" for a in algos] + \
        [f"{a.upper()} minus supervised (noise)" for a in algos] + \
        ["remaining errors removed: " + " / ".join(["supervised"] + [a.upper() for a in algos])]
    lines = []
    for r in rows:
        cells = [r["seed"], f"{r['warm start']:.1%}", f"{r['supervised']:.1%}"]
        cells += [f"{r[a]:.1%} (best {r[f'{a} best']:.1%})" for a in algos]
        cells += ["{:+.1f} (+-{:.1f})".format(*r[f"{a} - supervised"][:2]) for a in algos]
        cells.append(" / ".join(removed(r["warm start"], r[k]) for k in ["supervised", *algos]))
        lines.append(cells)
    return markdown_table(head, lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--algos", default="grpo,ppo")
    args = ap.parse_args()
    from actors.demo import run_demo
    from pipeline.plots import plot_comparison

    algos, rows = args.algos.split(","), []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = os.path.join(args.out, f"s{seed}", "demo_results.json")
        if not os.path.exists(path):
            run_demo(os.path.dirname(path), algos=algos, seed=seed)
        with open(path) as fh:
            rows.append(row(seed, json.load(fh)))
    print(table(rows, algos))
    for key in ["warm start", "supervised", *algos]:
        v = [r[key] for r in rows]
        print(f"{key}: mean {statistics.mean(v):.1%}, range {min(v):.1%}-{max(v):.1%}")
    for a in algos:
        d = [r[f"{a} - supervised"][0] for r in rows]
        held = sum(r[f"{a} - supervised"][2] for r in rows)
        beyond = sum(abs(r[f"{a} - supervised"][0]) > r[f"{a} - supervised"][1] for r in rows)
        print(f"{a} minus supervised: mean {statistics.mean(d):+.1f}, range {min(d):+.1f} to {max(d):+.1f} points; "
              f"above on {held} of {len(rows)} seeds, {beyond} of them beyond the eval's noise; "
              f"{min(r[f'{a} s/step'] for r in rows):.2f}-{max(r[f'{a} s/step'] for r in rows):.2f} s/step")
    curves = {k: [(r["seed"], r[k]) for r in rows] for k in ["warm start", "supervised", *algos]}
    png = plot_comparison(curves, os.path.join(args.out, "demo_seeds.png"), xlabel="seed",
                          ylabel="held-out exact match at the end", title="The arithmetic demo per seed")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
