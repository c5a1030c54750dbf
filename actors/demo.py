"""The local demo: what RL adds over supervised training, on a laptop CPU.

1. Warm start: a small model is fine-tuned on a small labelled split until held-out accuracy plateaus.
2. RL: each preset (GRPO, PPO) trains from that checkpoint on many unlabelled prompts through the
   exact-match verifier, for a budget in steps (the same run on any machine) or minutes.
3. Baseline: the same checkpoint gets further supervised training on the labelled split.
The claim, measured per seed (README): each RL preset ends above continued supervised training. The figures
and the verdict are printed, written to `<out>/demo_results.json`, plotted, and logged to one MLflow store.
"""
from __future__ import annotations

import json
import math
import os
import time

from pipeline.config import load_config


# The default budgets (README, per seed): ~7.5 min of GRPO, ~12 of PPO, ~4 of supervised training on 2 cores.
RL_STEPS = 500
SFT_STEPS = 2000


def demo_tracking_uri(out: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(out)}/mlflow.db"


def rl_budget(minutes: float | None, steps: int | None) -> list[str]:
    """Config overrides of an RL stage's budget: `steps` (the same run on any machine) and/or `minutes` (what a
    run costs here; steps per minute vary ~2.5x between machines of the same type). With steps alone the run
    has no time limit."""
    if steps is None and minutes is None:
        raise ValueError("an RL budget needs minutes or steps")
    return ([] if steps is None else [f"train.steps={steps}"]) + \
        [f"train.time_budget_s={'null' if minutes is None else minutes * 60}"]


def given_or_default(minutes: float | None, steps: int | None, default_steps: int) -> tuple:
    """(minutes, steps) of a stage: a budget the user gives replaces the default one whole (minutes alone then
    have no step limit; both end at whichever comes first); with none, the default steps and no time limit."""
    return (minutes, steps) if minutes is not None or steps is not None else (None, default_steps)


def _budget_text(minutes: float | None, steps: int | None) -> str:
    return " and at most ".join(x for x in (steps and f"{steps} steps", minutes and f"{minutes:g} minutes") if x)


def run_demo(out: str = "runs/demo", algos: tuple | list = ("grpo", "ppo"), rl_minutes: float | None = None,
             sft_minutes: float | None = None, seed: int | None = None, rl_steps: int | None = RL_STEPS,
             sft_steps: int | None = SFT_STEPS) -> dict:
    import pyarrow.parquet as pq

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
    results: dict = {"warm_start_plateau": plateau, "rl": {}, "rl_minutes": rl_minutes, "rl_steps": rl_steps,
                     "sft_minutes": sft_minutes, "sft_steps": sft_steps,
                     "eval_prompts": pq.read_metadata(f"{data_dir}/eval.parquet").num_rows}
    curves = {}
    for algo in algos:
        print(f"\n=== {algo}: {_budget_text(rl_minutes, rl_steps)} of RL from the warm start ===")
        cfg = load_config(algo, [f"model.path={warm_dir}", f"data.train_path={data_dir}/train.parquet",
                                 f"data.eval_path={data_dir}/eval.parquet", f"train.output_dir={out}/{algo}",
                                 *rl_budget(rl_minutes, rl_steps), f"train.seed={seed}",
                                 f"tracking.tracking_uri={uri}", f"tracking.run_name=demo-{algo}"])
        summary = run_training(cfg, overwrite=True)
        results["rl"][algo] = summary
        curves[algo] = summary["accuracy_curve_s"]
    if sft_minutes != 0 and (sft_minutes or sft_steps):       # --sft-minutes 0 skips the baseline
        print(f"\n=== baseline: {_budget_text(sft_minutes, sft_steps)} more of supervised training on the labelled "
              "split ===")
        sft = supervised_baseline(warm_dir, data_dir, sft_minutes, max_steps=sft_steps, seed=seed)
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


def above_supervised(rl: float, sft: float, n: int) -> tuple[bool, float]:
    """The demo's claim, that RL ends above continued supervised training on the n held-out prompts: whether it
    holds, and two standard errors of the difference of the two accuracies (treated as independent, which
    overstates the noise of a paired comparison) in points, for judging a small margin."""
    noise = 2 * math.sqrt((rl * (1 - rl) + sft * (1 - sft)) / n)
    return rl > sft, 100 * noise


def _report(results: dict) -> None:
    plateau = results["warm_start_plateau"]
    sft = results.get("sft", {}).get("final_accuracy")
    print("\n" + "=" * 72)
    print(f"warm start plateau (supervised, early-stopped):   {plateau:6.1%}")
    if sft is not None:
        print(f"+ {results['sft']['steps']:>6} more supervised steps:                   {sft:6.1%}")
    for algo, r in results["rl"].items():
        acc = r["final_accuracy"]
        print(f"{algo:>5} after {r['steps']:>5} RL steps ({r['elapsed_s'] / 60:4.1f} min):      {acc:6.1%}"
              f"  ({(acc - plateau) * 100:+.1f} points on the warm start)")
        if sft is not None:
            holds, noise = above_supervised(acc, sft, results["eval_prompts"])
            print(f"      {'meets' if holds else 'MISSES'} the claim, ends above continued supervised training: "
                  f"{(acc - sft) * 100:+.1f} points ({'beyond' if abs(acc - sft) * 100 > noise else 'inside'} "
                  f"the eval's noise, +-{noise:.1f})")
    print("=" * 72)


# ----------------------------------------------------------------------------- the preference demo

TRUE_SCORE_FN = "pipeline.demo.preference:true_score"
REWARD_MODELS = 3     # PPO's reward: the mean of this many reward models (seeds seed, seed + 1000, ...)
PREFERENCE_PPO_STEPS = 150


def run_preference_demo(out: str = "runs/preference", ppo_minutes: float | None = None, seed: int = 0,
                        sft_steps: int = 1200, rm_steps: int = 800, n_pairs: int = 6000,
                        reward_models: int = REWARD_MODELS, ppo_steps: int | None = PREFERENCE_PPO_STEPS) -> dict:
    """DeepSpeed-Chat's three steps on a task whose judge the pipeline never trains on
    (`pipeline.demo.preference`): SFT on mediocre demonstrations, a reward model on noisy preference pairs,
    PPO against the reward model (the mean of `reward_models` trained from different seeds: an ensemble, whose
    members' idiosyncratic errors PPO cannot exploit together) with a k1 KL penalty to the SFT policy and the
    critic started from the first reward model. Prints the ensemble's and each member's held-out pairwise
    accuracy against the noise ceiling; before and after PPO, the true score, the ensemble's score and the KL to
    the SFT policy; the minutes of each step. Writes `<out>/preference_results.json` and
    `<out>/preference_scores.png` (true and reward-model score per step: a rising reward-model score over a
    falling true score is reward hacking)."""
    import mlflow
    import pyarrow.parquet as pq

    from actors.run import run_training
    from pipeline.demo.preference import ensemble_accuracy, make_preference_task, measure_policy
    from pipeline.plots import plot_comparison
    from pipeline.runs.supervised import RewardModelConfig, SFTConfig, run_reward_model, run_sft
    from pipeline.runs.init_model import init_model

    flip, marks = 0.15, [time.monotonic()]           # wall clock at the start and at the end of each step
    paths = make_preference_task(os.path.join(out, "data"), flip=flip, n_pairs=n_pairs, seed=seed)
    print("=== 1/3 supervised fine-tuning on the demonstrations ===")
    # The task's characters only: letters no demonstration or pair holds would be scored by the reward model
    # blind (measured: PPO then collapsed onto such letters, reward-model score up, true score to ~0).
    init = init_model([paths["demos"], paths["pairs"]], os.path.join(out, "init"), chat_template=False, seed=seed)
    sft = run_sft(SFTConfig(model=init["path"], data=paths["demos"], out=os.path.join(out, "sft"), eval_size=200,
                            lr=3e-3, batch_size=64, max_steps=sft_steps, eval_every=100, patience=None, seed=seed),
                  overwrite=True)
    marks.append(time.monotonic())
    rms = []
    for k in range(reward_models):
        print(f"\n=== 2/3 reward model {k + 1} of {reward_models} on the preference pairs (Bradley-Terry, SFT "
              "backbone) ===")
        rms.append(run_reward_model(RewardModelConfig(
            model=sft["model_dir"], data=paths["pairs"], eval_data=paths["pairs_eval"],
            out=os.path.join(out, "reward_model" + (f"_{k + 1}" if k else "")), lr=2e-3, batch_size=64,
            max_steps=rm_steps, warmup_steps=50, eval_every=100, patience=None, seed=seed + 1000 * k),
            overwrite=True))
    rm_dirs = [rm["model_dir"] for rm in rms]
    ensemble = ensemble_accuracy(rm_dirs, paths["pairs_eval"])
    marks.append(time.monotonic())
    prompts = pq.read_table(paths["eval"]).column("prompt").to_pylist()
    before = measure_policy(sft["model_dir"], sft["model_dir"], rm_dirs, prompts, seed=seed)
    print(f"\n=== 3/3 PPO against the reward model, {_budget_text(ppo_minutes, ppo_steps)} ===")
    uri = demo_tracking_uri(out)
    cfg = load_config("ppo", [
        f"model.path={sft['model_dir']}", f"model.critic_path={rm_dirs[0]}",
        f"data.train_path={paths['prompts']}", "data.eval_path=null", "rollout.max_new_tokens=7",
        # The judge rides along with weight 0: logged per step (reward/fn/...), never trained on.
        f"reward.functions=[{TRUE_SCORE_FN}]", "reward.weights=[0.0]",
        "reward.models=[" + ", ".join(f"{{path: {d}, weight: {1 / len(rm_dirs)}}}" for d in rm_dirs) + "]",
        "reward.normalize=true", "reward.clip=5.0",
        "algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true", "algorithm.kl_estimator=k1",
        # The preset's 1e-4 is sized for the arithmetic demo; here, measured against the judge itself (no
        # reward model), it held the true score at ~0.50 for 400 steps, where 5e-4 reached 0.84 in 300.
        "learner.lr=5e-4",
        "resources.cpus_per_rollout_worker=0.5",          # the reference takes 0.25 of the 2 CPUs
        f"train.output_dir={out}/ppo", *rl_budget(ppo_minutes, ppo_steps), f"train.seed={seed}",
        f"tracking.tracking_uri={uri}", "tracking.run_name=preference-ppo"])
    ppo = run_training(cfg, overwrite=True)
    after = measure_policy(ppo["final_model"], sft["model_dir"], rm_dirs, prompts, seed=seed)
    marks.append(time.monotonic())
    client = mlflow.MlflowClient(uri)

    def curve(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(ppo["mlflow_run_id"], key)}

    members = [curve(f"reward/fn/rm/{os.path.basename(os.path.dirname(d))}") for d in rm_dirs]
    curves = {"true score (hidden judge)": sorted(curve(f"reward/fn/{TRUE_SCORE_FN}").items()),
              "reward model score" + (" (ensemble mean)" if len(rm_dirs) > 1 else ""):
              [(step, sum(m[step] for m in members) / len(members)) for step in sorted(members[0])]}
    accuracies = [rm["kept_metrics"]["eval/accuracy"] for rm in rms]
    minutes = {step: (end - start) / 60 for step, start, end in zip(("sft", "reward_models", "ppo"), marks, marks[1:])}
    minutes["total"] = (marks[-1] - marks[0]) / 60
    results = {"reward_model_accuracy": ensemble, "reward_model_accuracies": accuracies,
               "noise_ceiling": 1 - flip,
               "sft": {k: v for k, v in before.items() if k != "examples"},
               "ppo": {k: v for k, v in after.items() if k != "examples"}, "ppo_steps": ppo["steps"],
               "minutes": minutes,
               "examples": {"sft": before["examples"], "ppo": after["examples"]}}
    with open(os.path.join(out, "preference_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    png = plot_comparison(curves, os.path.join(out, "preference_scores.png"), xlabel="PPO step",
                          ylabel="mean score of the step's samples", title="PPO against a learned reward model")
    _report_preference(results)
    print(f"\nplot: {png}\nMLflow UI: mlflow ui --backend-store-uri {uri}")
    return results


def half_way_target(sft_true_score: float) -> float:
    """The preference demo's target for PPO: half the distance from the SFT policy's true score to the maximum,
    1.0."""
    return sft_true_score + 0.5 * (1.0 - sft_true_score)


def _report_preference(r: dict) -> None:
    acc, ceiling = r["reward_model_accuracy"], r["noise_ceiling"]
    s, p = r["sft"], r["ppo"]
    target = half_way_target(s["true_score"])
    print("\n" + "=" * 72)
    members = r["reward_model_accuracies"]
    what = f" (ensemble of {len(members)}; each {', '.join(f'{a:.1%}' for a in members)})" if len(members) > 1 else ""
    print(f"reward model{what}, held-out pairwise accuracy: {acc:.1%} (noise ceiling {ceiling:.0%}; "
          f"{'meets' if acc >= 0.9 * ceiling else 'MISSES'} the 90%-of-ceiling target, {0.9 * ceiling:.1%})")
    print(f"{'':24}{'true score':>12}{'reward model':>14}{'KL to SFT':>11}")
    for name, m in (("SFT policy", s), (f"after PPO ({r['ppo_steps']} steps)", p)):
        print(f"{name:24}{m['true_score']:12.3f}{m['reward_model_score']:14.3f}{m['kl_to_sft']:11.3f}")
    verdict = "meets" if p["true_score"] >= target else "MISSES"
    print(f"true score {s['true_score']:.3f} -> {p['true_score']:.3f} (max 1.0; {verdict} the half-way target "
          f"{target:.3f})")
    if p["reward_model_score"] > s["reward_model_score"] and p["true_score"] < s["true_score"]:
        print("REWARD HACKING: the reward model's score rose while the true score fell")
    m = r["minutes"]
    print(f"{m['total']:.1f} minutes: SFT {m['sft']:.1f}, reward models {m['reward_models']:.1f}, PPO {m['ppo']:.1f} "
          "(with the measurements before and after)")
    print("=" * 72)


# ----------------------------------------------------------------------------- the tools demo

TOOLS_RL_STEPS = 200
TOOLS_SFT_STEPS = 1000
TOOLS_SEED = 0


def run_tools_demo(out: str = "runs/tools", seed: int = TOOLS_SEED, rl_minutes: float | None = None,
                   rl_steps: int | None = TOOLS_RL_STEPS, sft_steps: int = TOOLS_SFT_STEPS,
                   warm_steps: int | None = None, eval_rows: int = 500) -> dict:
    """An agent that has to use a tool (`pipeline.demo.tools`): chase a key through a hidden table with `get`.
    1. Supervised start on demonstrated episodes (observations masked): 254 chains of 2 lookups, 2 of 3.
    2. GRPO through the environment from that start, on prompts only (the environment pays the answer).
    3. Baseline: the same start trained further on the same demonstrations.
    Before and after, each policy runs one sampled episode per held-out row in this process (the same evaluator
    for all three): success overall and per chain length, turns and tool calls per episode. Writes
    `<out>/tools_results.json` and `<out>/tools_success.png`, and logs to one MLflow store."""
    import pyarrow.parquet as pq
    import torch

    from actors.run import run_training
    from pipeline.demo.tools import CHARS, WARM, env_config, episode_sft_trainer, make_tools_task, measure_episodes
    from pipeline.demo.warmstart import _demo_threads
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.plots import plot_comparison
    from pipeline.small_models import build_tiny_model
    from pipeline.tracking import Tracker
    from pipeline.trainers.loop import train_loop

    marks = [time.monotonic()]
    paths = make_tools_task(os.path.join(out, "data"), seed=seed)
    demos = pq.read_table(paths["demos"]).to_pylist()
    held_out = pq.read_table(paths["eval"]).to_pylist()[:eval_rows]
    during = held_out[:200]                         # the evaluations that pick the start and draw the curves

    @_demo_threads
    def supervised(model_dir: str, steps: int, start: bool):
        """The start: lr warmed up, then decayed to 10% at the last step; the baseline goes on at that 10%."""
        torch.manual_seed(seed)
        model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
        schedule = dict(lr=WARM["lr"], warmup_steps=WARM["warmup_steps"], decay_steps=steps) if start else \
            dict(lr=0.1 * WARM["lr"])
        trainer = episode_sft_trainer(model, tokenizer, demos, during, seed, batch_size=WARM["batch_size"], seed=seed,
                                      **schedule)
        result = train_loop(trainer, eval_every=min(WARM["eval_every"], steps), max_steps=steps)
        return model, tokenizer, result

    @_demo_threads
    def measure(model_dir: str) -> dict:
        return measure_episodes(load_causal_lm(model_dir), load_tokenizer(model_dir), held_out, seed, eval_seed=1)

    print(f"=== 1/3 supervised start: {warm_steps or WARM['steps']} steps on {len(demos)} demonstrated episodes ===")
    init = build_tiny_model(os.path.join(out, "init"), max_positions=256, seed=seed, chars=CHARS)
    model, tokenizer, warm = supervised(init, warm_steps or WARM["steps"], True)
    warm_dir = os.path.join(out, "warm")
    model.save_pretrained(warm_dir, safe_serialization=True)
    tokenizer.save_pretrained(warm_dir)
    marks.append(time.monotonic())

    print(f"\n=== 2/3 GRPO through the environment, {_budget_text(rl_minutes, rl_steps)} ===")
    uri = demo_tracking_uri(out)
    env = env_config(seed)
    cfg = load_config("grpo", [
        f"model.path={warm_dir}", f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}",
        "data.eval_size=200", f"env.name={env.name}", f"env.args={{seed: {seed}}}", f"env.max_turns={env.max_turns}",
        f"env.max_turn_tokens={env.max_turn_tokens}", f"env.max_episode_tokens={env.max_episode_tokens}",
        f"rollout.max_new_tokens={env.max_turn_tokens}", "rollout.prompts_per_step=16",
        "rollout.samples_per_prompt=8", "learner.lr=1e-4", "train.eval_every=50", "train.eval_every_s=null",
        "checkpoint.every=50", f"train.output_dir={out}/grpo", *rl_budget(rl_minutes, rl_steps),
        f"train.seed={seed}", f"tracking.tracking_uri={uri}", "tracking.run_name=tools-grpo"])
    rl = run_training(cfg, overwrite=True)
    marks.append(time.monotonic())

    print(f"\n=== 3/3 baseline: {sft_steps} more supervised steps on the same demonstrations ===")
    model, tokenizer, sft = supervised(warm_dir, sft_steps, False)
    sft_dir = os.path.join(out, "sft_more")
    model.save_pretrained(sft_dir, safe_serialization=True)
    tokenizer.save_pretrained(sft_dir)
    marks.append(time.monotonic())

    results = {"seed": seed, "eval_rows": len(held_out), "rl_steps": rl["steps"], "sft_steps": sft["steps"],
               "start": measure(warm_dir), "rl": measure(rl["final_model"]), "sft": measure(sft_dir),
               "minutes": {stage: (b - a) / 60 for stage, a, b in zip(("start", "rl", "sft"), marks, marks[1:])}}
    results["minutes"]["total"] = (time.monotonic() - marks[0]) / 60
    with open(os.path.join(out, "tools_results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    curves = {"GRPO": rl["accuracy_curve_s"],
              "more supervised training": [(t, m["eval/accuracy"]) for _, t, m in sft["curve"]]}
    png = plot_comparison(curves, os.path.join(out, "tools_success.png"), xlabel="seconds of training",
                          ylabel="held-out episode success (200 rows)", title="Tool use: RL vs more supervised training")
    with Tracker(out, experiment="rlpipe", run_name="tools-summary", tracking_uri=uri) as tracker:
        tracker.log_metrics(0, {f"{who}_{k.split('/', 1)[1]}": v for who in ("start", "rl", "sft")
                                for k, v in results[who].items() if k.startswith("eval/success")})
        tracker.log_artifact(png)
        tracker.log_artifact(os.path.join(out, "tools_results.json"))
    _report_tools(results)
    print(f"\nplot: {png}\nMLflow UI: mlflow ui --backend-store-uri {uri}")
    return results


def _report_tools(r: dict) -> None:
    print("\n" + "=" * 78)
    print(f"held-out episodes ({r['eval_rows']} rows, one sampled episode each)")
    print(f"{'':34}{'success':>8}{'2 lookups':>10}{'3 lookups':>10}{'turns':>7}{'calls':>7}")
    for key, name in (("start", "supervised start"), ("sft", f"+ {r['sft_steps']} supervised steps"),
                      ("rl", f"+ {r['rl_steps']} GRPO steps")):
        m = r[key]
        print(f"{name:34}{m['eval/success']:8.1%}{m['eval/success_2_lookups']:10.1%}{m['eval/success_3_lookups']:10.1%}"
              f"{m['eval/turns']:7.2f}{m['eval/tool_calls']:7.2f}")
    rl, sft = r["rl"]["eval/success"], r["sft"]["eval/success"]
    holds, noise = above_supervised(rl, sft, r["eval_rows"])
    print(f"{'meets' if holds and (rl - sft) * 100 > noise else 'MISSES'} the claim, RL ends above more supervised "
          f"training beyond the eval's noise: {(rl - sft) * 100:+.1f} points (noise +-{noise:.1f})")
    m = r["minutes"]
    print(f"{m['total']:.1f} minutes: supervised start {m['start']:.1f}, GRPO {m['rl']:.1f}, more supervised "
          f"{m['sft']:.1f} (and the measurements)")
    print("=" * 78)
