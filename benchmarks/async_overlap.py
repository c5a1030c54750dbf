"""Synchronous against asynchronous rollouts (rollout.max_staleness = 1, 2) on the demo task.

Each mode trains the demo's GRPO preset from the same warm start for the same wall time, the generator and
the learner on separate CPU shares (one core each, one torch thread each), through the real `rlpipe train`
loop. pi_old is the learner's (the preset's one optimizer step per batch takes it from the update's own
forward), with importance weights truncated at --tis-cap, in every mode (asynchronous training needs it);
"0-sampler" adds the synchronous loop as the preset runs it, with the sampler's log-probs as pi_old.
Reported per mode: steps, samples/s over the training steps (evaluation excluded), median step time, held-out
exact match against the run's seconds (evaluated about every --eval-every-s seconds; the run's
clock, and its budget, include the evaluations, alike for every mode) and its best.
Modes run one after another, in the order given, --repeats times in rotation, so a slow spell of the
machine hits every mode alike.

    python benchmarks/async_overlap.py [--warm runs/demo] [--minutes 3] [--staleness 0,1,2] [--repeats 1]
        [--tis-cap 2.0] [--out runs/benchmarks]

Needs the demo warm start (`rlpipe warmstart --out DIR`, then --warm DIR). Writes async_overlap.json,
async_overlap.md (a table) and async_overlap.png (accuracy against wall time) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAMES = {"0": "synchronous", "0-sampler": "synchronous, pi_old from the sampler"}


def run_mode(mode: str, args) -> dict:
    """mode: a staleness ("0", "1", ...), pi_old from the learner with truncated importance weights
    in every one; or "0-sampler", the synchronous loop as the preset runs it (pi_old = the sampler's)."""
    from actors.run import run_training
    from pipeline.config import load_config

    staleness = int(mode.split("-")[0])
    pi_old = ["algorithm.old_logprobs=auto"] if mode.endswith("-sampler") else \
        [f"algorithm.tis_cap={args.tis_cap}", "algorithm.old_logprobs=learner"]

    out = tempfile.mkdtemp(prefix=f"rlpipe-async{staleness}-")
    cfg = load_config("grpo", [
        f"model.path={args.warm}/warm", f"data.train_path={args.warm}/data/train.parquet",
        f"data.eval_path={args.warm}/data/eval.parquet", f"data.eval_size={args.eval_size}",
        "train.steps=100000", f"train.time_budget_s={60 * args.minutes}", f"train.eval_every_s={args.eval_every_s}",
        "train.eval_every=100000", "checkpoint.every=0", "train.log_samples_every=0", "tracking.plot=false",
        f"train.output_dir={out}/run", "resources.num_cpus=3", "resources.cpus_per_rollout_worker=1",
        "resources.cpus_per_learner=1", "resources.cpus_per_reward_scorer=0.5", "resources.torch_threads=1",
        f"rollout.max_staleness={staleness}", *pi_old])
    steps: list[dict] = []
    summary = run_training(cfg, on_step=lambda step, m, trainer: steps.append(m), log=lambda *a: None)
    samples = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    train_s = sum(m["time/step_s"] for m in steps)
    curve = [(round(s, 1), acc) for s, acc in summary["accuracy_curve_s"]]
    return {"mode": mode, "staleness": staleness, "steps": len(steps), "train_s": train_s,
            "samples_per_s": samples * len(steps) / max(train_s, 1e-9),
            "median_step_s": statistics.median(m["time/step_s"] for m in steps),
            "max_staleness_seen": max(m["policy/staleness"] for m in steps),
            "eval_curve": curve, "best_accuracy": max((a for _, a in curve), default=None),
            "final_accuracy": curve[-1][1] if curve else None}


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["mode"], []).append(r)
    base = statistics.mean(r["samples_per_s"] for r in by.get("0", rows))
    lines = ["| mode | runs | steps | samples/s | vs sync | median step (s) | held-out final | held-out best |",
             "|---|---|---|---|---|---|---|---|"]
    for s, rs in by.items():
        sps = statistics.mean(r["samples_per_s"] for r in rs)
        name = NAMES.get(s, f"async, staleness {s}")
        lines.append(f"| {name} | {len(rs)} | {statistics.mean(r['steps'] for r in rs):.0f} | {sps:.1f} | "
                     f"{sps / base:.2f}x | {statistics.mean(r['median_step_s'] for r in rs):.2f} | "
                     f"{statistics.mean(r['final_accuracy'] for r in rs):.1%} | "
                     f"{statistics.mean(r['best_accuracy'] for r in rs):.1%} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs, ys = zip(*r["eval_curve"]) if r["eval_curve"] else ((), ())
        ax.plot(xs, ys, marker="o", label=NAMES.get(r["mode"], f"async, staleness {r['mode']}"))
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out exact match")
    ax.set_title("Asynchronous rollouts on the demo task (1 core generator, 1 core learner)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", default="runs/demo", help="the warm start's folder (rlpipe warmstart --out)")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall time per run")
    p.add_argument("--staleness", default="0,1,2", help="modes: staleness values; 0-sampler = the synchronous loop "
                   "with the preset's pi_old (the sampler's, no importance weights)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tis-cap", type=float, default=2.0)
    p.add_argument("--eval-every-s", type=float, default=30.0)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.warm, "warm")):
        raise SystemExit(f"--warm: no warm start in {args.warm!r}; run `rlpipe warmstart --out {args.warm}` first")
    rows = []
    for _ in range(args.repeats):
        for s in args.staleness.split(","):
            print(f"staleness {s} ...", flush=True)
            rows.append(run_mode(s, args))
            print("  " + json.dumps({k: v for k, v in rows[-1].items() if k != "eval_curve"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "async_overlap.json"), "w") as fh:
        json.dump({"rows": rows, "minutes": args.minutes, "tis_cap": args.tis_cap}, fh, indent=2)
    md = table(rows)
    with open(os.path.join(args.out, "async_overlap.md"), "w") as fh:
        fh.write(md + "\n")
    plot(rows, os.path.join(args.out, "async_overlap.png"))
    print(md)
    return {"rows": rows}


if __name__ == "__main__":
    main()
