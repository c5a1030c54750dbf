"""The preference demo per seed: the README's table, reproducible by one command.

For each seed, `rlpipe demo --task preference --seed S` with its default budgets in steps (SFT, three reward
models, PPO against their mean), into <out>/s<S>; a seed whose `preference_results.json` exists is read, not
rerun. Prints a markdown table (the reward ensemble's held-out pairwise accuracy and its members'; before and
after PPO the true score, the ensemble's score and the KL to the SFT policy; the half-way target and whether it
is met; minutes), the count of seeds that meet each target, and plots the true scores per seed to
<out>/preference_seeds.png.

    python benchmarks/preference_seeds.py --seeds 0,1,2 --out runs/preference_seeds     # ~12 min per seed here
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.demo import half_way_target, run_preference_demo  # noqa: E402
from pipeline.plots import markdown_table, plot_comparison  # noqa: E402


def table(rows: list[tuple[int, dict]]) -> str:
    head = ["seed", "reward ensemble held-out (members)", "true score SFT -> PPO", "half-way target",
            "ensemble score SFT -> PPO", "KL to SFT", "PPO steps", "minutes (reward models, PPO)"]
    lines = []
    for seed, r in rows:
        s, p, target = r["sft"], r["ppo"], half_way_target(r["sft"]["true_score"])
        m = r.get("minutes")
        cells = [seed,
                 f"{r['reward_model_accuracy']:.1%} ({', '.join(f'{a:.1%}' for a in r['reward_model_accuracies'])})",
                 f"{s['true_score']:.3f} -> **{p['true_score']:.3f}**",
                 f"{target:.3f} ({'met' if p['true_score'] >= target else 'MISSED'})",
                 f"{s['reward_model_score']:.3f} -> {p['reward_model_score']:.3f}", f"{p['kl_to_sft']:.2f}",
                 str(r["ppo_steps"]),
                 f"{m['total']:.1f} ({m['reward_models']:.1f}, {m['ppo']:.1f})" if m else "not recorded"]
        lines.append(cells)
    return markdown_table(head, lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/preference_seeds")
    args = ap.parse_args()

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        path = os.path.join(args.out, f"s{seed}", "preference_results.json")
        if not os.path.exists(path):
            run_preference_demo(os.path.dirname(path), seed=seed)
        with open(path) as fh:
            rows.append((seed, json.load(fh)))
    print(table(rows))
    ceiling = rows[0][1]["noise_ceiling"]
    rm_met = sum(r["reward_model_accuracy"] >= 0.9 * ceiling for _, r in rows)
    ppo_met = sum(r["ppo"]["true_score"] >= half_way_target(r["sft"]["true_score"]) for _, r in rows)
    print(f"reward ensemble at >= 90% of the noise ceiling ({0.9 * ceiling:.1%}) on {rm_met} of {len(rows)} seeds; "
          f"PPO past the half-way target on {ppo_met} of {len(rows)}")
    curves = {"SFT policy": [(seed, r["sft"]["true_score"]) for seed, r in rows],
              "half-way target": [(seed, half_way_target(r["sft"]["true_score"])) for seed, r in rows],
              "after PPO": [(seed, r["ppo"]["true_score"]) for seed, r in rows]}
    png = plot_comparison(curves, os.path.join(args.out, "preference_seeds.png"), xlabel="seed",
                          ylabel="true score (hidden judge), max 1.0", title="The preference demo per seed")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
