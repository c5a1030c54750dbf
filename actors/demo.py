"""The local demo: what RL adds over supervised training, on a laptop CPU.

1. Warm start: a small model is fine-tuned on a small labelled split until held-out accuracy plateaus.
2. RL: each preset (GRPO, PPO) trains from that checkpoint on many unlabelled prompts through the
   exact-match verifier, for a fixed time budget.
3. Baseline: the same checkpoint gets the same number of minutes of further supervised training.
The figures are printed, written to `<out>/demo_results.json`, plotted, and logged to one MLflow store.
"""
from __future__ import annotations

import json
import os

from pipeline.config import load_config


def demo_tracking_uri(out: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(out)}/mlflow.db"


def run_demo(out: str = "runs/demo", algos: tuple | list = ("grpo", "ppo"), rl_minutes: float = 10.0,
             sft_minutes: float = 10.0, seed: int | None = None) -> dict:
    from actors.run import run_training
    from pipeline.demo.warmstart import DEMO_SEED, run_warmstart, supervised_baseline
    from pipeline.plots import plot_comparison
    from pipeline.tracking import Tracker

    seed = DEMO_SEED if seed is None else seed     # generalisation from 1,000 labels depends on it (warmstart.py)

    warm_dir, data_dir = os.path.join(out, "warm"), os.path.join(out, "data")
    info_path = os.path.join(out, "warmstart.json")
    if os.path.exists(os.path.join(warm_dir, "config.json")) and os.path.exists(info_path):
        with open(info_path) as fh:
            warm = json.load(fh)
        print(f"reusing the warm start in {warm_dir}: plateau {warm['plateau_accuracy']:.1%}")
    else:
        warm = run_warmstart(out, seed=seed)
    plateau = warm["plateau_accuracy"]
    uri = demo_tracking_uri(out)
    results: dict = {"warm_start_plateau": plateau, "rl": {}, "rl_minutes": rl_minutes, "sft_minutes": sft_minutes}
    curves = {}
    for algo in algos:
        print(f"\n=== {algo}: {rl_minutes:g} minutes of RL from the warm start ===")
        cfg = load_config(algo, [f"model.path={warm_dir}", f"data.train_path={data_dir}/train.parquet",
                                 f"data.eval_path={data_dir}/eval.parquet", f"train.output_dir={out}/{algo}",
                                 f"train.time_budget_s={rl_minutes * 60}", f"train.seed={seed}",
                                 f"tracking.tracking_uri={uri}", f"tracking.run_name=demo-{algo}"])
        summary = run_training(cfg, overwrite=True)
        results["rl"][algo] = summary
        curves[algo] = summary["accuracy_curve_s"]
    if sft_minutes > 0:
        print(f"\n=== baseline: {sft_minutes:g} more minutes of supervised training on the labelled split ===")
        sft = supervised_baseline(warm_dir, data_dir, sft_minutes, seed=seed)
        results["sft"] = {k: sft[k] for k in ("start_accuracy", "final_accuracy", "best_accuracy", "steps")}
        curves["supervised"] = [(s, a) for _, s, a in sft["curve"]]
    _report(results)
    with open(os.path.join(out, "demo_results.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    png = plot_comparison(curves, os.path.join(out, "demo_accuracy.png"), xlabel="seconds of training",
                          ylabel="held-out exact match", title="RL vs continued supervised training")
    with Tracker(out, experiment="rlpipe", run_name="demo-summary", tracking_uri=uri) as tracker:
        flat = {"plateau": plateau, **{f"{a}_final": r["final_accuracy"] for a, r in results["rl"].items()}}
        if "sft" in results:
            flat["sft_final"] = results["sft"]["final_accuracy"]
        tracker.log_metrics(0, flat)
        tracker.log_artifact(png)
        tracker.log_artifact(os.path.join(out, "demo_results.json"))
    print(f"\nplot: {png}\nMLflow UI: mlflow ui --backend-store-uri {uri}")
    return results


def _report(results: dict) -> None:
    plateau = results["warm_start_plateau"]
    sft = results.get("sft", {}).get("final_accuracy")
    print("\n" + "=" * 72)
    print(f"warm start plateau (supervised, early-stopped):   {plateau:6.1%}")
    if sft is not None:
        print(f"+ {results['sft_minutes']:g} min more supervised training:            {sft:6.1%}")
    for algo, r in results["rl"].items():
        gain = (r["final_accuracy"] - plateau) * 100
        verdict = "meets" if gain >= 15 and (sft is None or r["final_accuracy"] > sft) else "MISSES"
        print(f"{algo:>5} after {r['elapsed_s'] / 60:4.1f} min of RL:                   {r['final_accuracy']:6.1%}"
              f"  ({gain:+.1f} points; {verdict} the +15-point, beat-SFT target)")
    print("=" * 72)
