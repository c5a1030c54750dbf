"""The tools demo per seed: the table of docs/results/tools-demo.md, reproducible by one command.

For each seed, `rlpipe demo --task tools --seed S` with its default budgets in steps (the supervised start,
GRPO through the environment, more supervised training), into <out>/s<S>; a seed whose `tools_results.json`
exists is read, not rerun. Prints a markdown table (held-out episode success of the supervised start, of more
supervised training and of GRPO, overall and on chains of 3 lookups; RL minus more supervised training with the
eval's noise; tool calls per episode; minutes) with a last row of means and ranges, the count of seeds where RL ends above more supervised training
beyond the noise, and plots success per seed to <out>/tools_seeds.png.

    python benchmarks/tools_seeds.py --seeds 0,1,2,3,4 --out runs/tools_seeds     # ~30 min per seed here
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.demo import above_supervised, run_tools_demo  # noqa: E402
from pipeline.plots import markdown_table, plot_comparison  # noqa: E402


def beyond_noise(r: dict) -> tuple[float, float, bool]:
    """(RL - more SFT in points, the eval's noise in points, whether RL is above beyond it)."""
    rl, sft = r["rl"]["eval/success"], r["sft"]["eval/success"]
    holds, noise = above_supervised(rl, sft, r["eval_rows"])
    return 100 * (rl - sft), noise, holds and 100 * (rl - sft) > noise


def table(rows: list[tuple[int, dict]]) -> str:
    head = ["seed", "supervised start (3 lookups)", "+ more supervised (3 lookups)", "+ GRPO (3 lookups)",
            "GRPO - more supervised", "tool calls per episode: start -> GRPO", "minutes (start, GRPO, more SFT)"]
    lines = []
    for seed, r in rows:
        diff, noise, ok = beyond_noise(r)
        cell = lambda m: f"{m['eval/success']:.1%} ({m['eval/success_3_lookups']:.1%})"  # noqa: E731
        m = r["minutes"]
        lines.append([seed, cell(r["start"]), cell(r["sft"]), f"**{cell(r['rl'])}**",
                      f"{diff:+.1f} (noise +-{noise:.1f}; {'beyond' if ok else 'NOT beyond'})",
                      f"{r['start']['eval/tool_calls']:.2f} -> {r['rl']['eval/tool_calls']:.2f}",
                      f"{m['total']:.1f} ({m['start']:.1f}, {m['rl']:.1f}, {m['sft']:.1f})"])
    if len(rows) > 1:
        def spread(values: list[float], pct: bool = True) -> str:
            scale, unit = (100, "%") if pct else (1, "")
            mean = scale * sum(values) / len(values)
            return f"{mean:.1f}{unit} ({scale * min(values):.0f}-{scale * max(values):.0f})"

        success = lambda key: spread([r[key]["eval/success"] for _, r in rows])  # noqa: E731
        diffs = [beyond_noise(r)[0] for _, r in rows]
        lines.append(["mean (range)", success("start"), success("sft"), f"**{success('rl')}**",
                      f"{sum(diffs) / len(diffs):+.1f} ({min(diffs):+.0f} to {max(diffs):+.0f})", "",
                      spread([r["minutes"]["total"] for _, r in rows], pct=False)])
    return markdown_table(head, lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="runs/tools_seeds")
    args = ap.parse_args()

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = os.path.join(args.out, f"s{seed}", "tools_results.json")
        if not os.path.exists(path):
            run_tools_demo(os.path.dirname(path), seed=seed)
        with open(path) as fh:
            rows.append((seed, json.load(fh)))
    print(table(rows))
    met = sum(beyond_noise(r)[2] for _, r in rows)
    print(f"GRPO ends above more supervised training beyond the eval's noise on {met} of {len(rows)} seeds")
    curves = {name: [(seed, r[key]["eval/success"]) for seed, r in rows]
              for key, name in (("start", "supervised start"), ("sft", "+ more supervised training"),
                                ("rl", "+ GRPO through the environment"))}
    png = plot_comparison(curves, os.path.join(args.out, "tools_seeds.png"), xlabel="seed",
                          ylabel="held-out episode success", title="The tools demo per seed")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
