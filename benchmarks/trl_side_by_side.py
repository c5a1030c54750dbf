"""rlpipe GRPO against TRL's GRPOTrainer: same warm start, same batch, same wall-clock budget.

Runs the two one after the other (never together: they would share the cores), each for --minutes of
training wall time, and prints per system the held-out accuracy curve (seconds, exact match), the median
seconds per step, steps done, final and best accuracy; then a side-by-side summary. Writes a PNG of both
curves and a JSON with every number (and TRL's full GRPOConfig) to --out.

    pip install -e '.[bench]'            # trl, the optional benchmark dependency
    python benchmarks/trl_side_by_side.py --warm runs/demo/warm --data runs/demo/data --minutes 10 \
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 6 --lr 2e-4 --eval-size 500 \
        --eval-every-s 30 [--only trl|rlpipe] [--out runs/bench_trl]

What is matched: B prompts x G samples per step, one optimizer step per rollout batch (TRL:
per_device_train_batch_size = B*G, one accumulation step, num_iterations 1; rlpipe: one minibatch of
B*G), completion cap T, AdamW at a constant lr with no weight decay and grad-norm clip 1.0, clip epsilon
0.2, no KL (beta 0 / kl_coef 0, so no reference model), temperature 1, rewards = exact match, advantages
normalised by the group's std, token-mean loss over the whole batch (TRL "dapo"), fp32, no gradient
checkpointing, 2 torch threads. Evaluation is the same function on both sides: greedy exact match on the
first --eval-size rows of eval.parquet with T new tokens.

Time accounting (identical on both sides): elapsed = training steps + held-out evaluations. Start-up
(imports, model load, Ray and actors, trainer construction), the step-0 evaluation, per-step logging and
saving are excluded. A run stops after the step that reaches the budget; that step still evaluates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEMS = ("trl", "rlpipe")
THREADS = 2                   # rlpipe's grpo preset gives each actor 2 torch threads; TRL gets the same


def eval_rows(data_dir: str, n: int) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(data_dir, "eval.parquet")).slice(0, n)
    return table.column("prompt").to_pylist(), [str(a) for a in table.column("answer").to_pylist()]


# ------------------------------------------------------------------------------------------------ rlpipe
def run_rlpipe(args) -> dict:
    from actors.run import run_training
    from pipeline.config import load_config

    budget_s = 60 * args.minutes
    cfg = load_config("grpo", [
        f"model.path={args.warm}", f"data.train_path={args.data}/train.parquet",
        f"data.eval_path={args.data}/eval.parquet", f"data.eval_size={args.eval_size}",
        f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.samples_per_prompt={args.samples_per_prompt}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"learner.lr={args.lr}",
        f"learner.minibatch_size={args.prompts_per_step * args.samples_per_prompt}",   # one optimizer step
        f"resources.torch_threads={THREADS}", f"train.time_budget_s={budget_s}", "train.eval_every=1000000000",
        f"train.eval_every_s={args.eval_every_s}",
        "train.seed=0", f"train.output_dir={args.out}/rlpipe", "checkpoint.every=0", "train.log_samples_every=0",
        "tracking.plot=false"])
    steps: list[dict] = []
    evals: list[tuple[int, float]] = []                  # (step, seconds spent evaluating)

    def on_step(step: int, metrics: dict, trainer) -> None:
        elapsed_s = metrics["time/elapsed_s"]
        if metrics.get("eval/accuracy") is not None:     # elapsed grew by this step and its evaluation
            evals.append((step, elapsed_s - (steps[-1]["elapsed_s"] if steps else 0.0) - metrics["time/step_s"]))
        steps.append({"step": step, "step_s": metrics["time/step_s"], "reward": metrics["reward/mean"],
                      "elapsed_s": elapsed_s})

    wall = time.perf_counter()
    summary = run_training(cfg, overwrite=True, on_step=on_step)
    return {"curve": [(round(s, 1), a) for s, a in summary["accuracy_curve_s"]],
            "eval_steps": [0, *(step for step, _ in evals)], "eval_s": [e for _, e in evals],
            "steps": summary["steps"], "elapsed_s": summary["elapsed_s"], "step_s": [s["step_s"] for s in steps],
            "reward": [s["reward"] for s in steps], "wall_s_incl_startup": round(time.perf_counter() - wall, 1),
            "config": cfg.to_dict()}


# ------------------------------------------------------------------------------------------------ TRL
def trl_config(args):
    """GRPOConfig matched to rlpipe's grpo preset (field names checked against TRL 1.16's grpo_config.py)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=f"{args.out}/trl", seed=0,
        # one generation of B*G completions per optimizer step (generation_batch_size = 1 x B*G)
        per_device_train_batch_size=args.prompts_per_step * args.samples_per_prompt,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.samples_per_prompt,
        num_iterations=1, max_completion_length=args.max_new_tokens, max_steps=1_000_000_000,
        temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=None, loss_type="dapo", scale_rewards="group",
        importance_sampling_level="token", mask_truncated_completions=False, top_entropy_quantile=1.0,
        entropy_coef=0.0, use_vllm=False, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, shuffle_dataset=True, dataloader_num_workers=0,
    )


def trl_callback(budget_s: float, eval_every_s: float, evaluate):
    from transformers import TrainerCallback

    class BudgetAndEval(TrainerCallback):
        """Times each step; evaluates after a step once `eval_every_s` training seconds passed since the last
        eval, and after the step that spends the budget, then stops: rlpipe's rule (`train.eval_every_s`,
        `train.time_budget_s`), evaluation time included in both."""

        def __init__(self):
            self.last_eval_s = 0.0
            self.elapsed_s, self.curve, self.step_s, self.reward = 0.0, [], [], []
            self.eval_steps, self.eval_s = [0], []

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.curve.append((0.0, evaluate(model)))              # step 0, not counted (as rlpipe's)
            print(f"[trl] step 0: held-out exact match {self.curve[0][1]:.1%} before RL", flush=True)

        def on_step_begin(self, args, state, control, **kw):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            # generate + score + loss + backward + clip + optimizer step all ran since on_step_begin
            step_s = time.perf_counter() - self._start
            self.step_s.append(step_s)
            self.elapsed_s += step_s
            out_of_time = self.elapsed_s >= budget_s
            if self.elapsed_s - self.last_eval_s >= eval_every_s or out_of_time:
                start = time.perf_counter()
                acc = evaluate(model)
                self.eval_s.append(time.perf_counter() - start)
                self.elapsed_s += self.eval_s[-1]
                self.curve.append((round(self.elapsed_s, 1), acc))
                self.eval_steps.append(state.global_step)
                self.last_eval_s = self.elapsed_s - self.eval_s[-1]
            control.should_training_stop = self.elapsed_s >= budget_s       # evaluation time counts

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.reward.append(logs["reward"])
                acc = f" | eval {self.curve[-1][1]:.1%}" if self.curve[-1][0] == round(self.elapsed_s, 1) else ""
                print(f"[trl] step {state.global_step} | reward {logs['reward']:.2f}±{logs.get('reward_std', 0):.2f}"
                      f"{acc} | {self.step_s[-1]:.2f} s/step | {self.elapsed_s:.0f} s", flush=True)

    return BudgetAndEval()


def run_trl(args) -> dict:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    from pipeline.rollout.evaluation import exact_match_accuracy
    from pipeline.rewards.functions import exact_match      # (prompts, completions, answer, **_): TRL passes columns

    wall = time.perf_counter()
    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(args.warm, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.warm)
    tokenizer.padding_side = "left"
    table = pq.read_table(os.path.join(args.data, "train.parquet"), columns=["prompt", "answer"])
    train = Dataset.from_dict({"prompt": table.column("prompt").to_pylist(),
                               "answer": [str(a) for a in table.column("answer").to_pylist()]})
    prompts, answers = eval_rows(args.data, args.eval_size)
    callback = trl_callback(60 * args.minutes, args.eval_every_s, lambda m: exact_match_accuracy(
        m, tokenizer, prompts, answers, args.max_new_tokens, batch_size=250))
    config = trl_config(args)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match], args=config, train_dataset=train,
                          processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)     # our callback prints one short line per step
    if torch.get_num_threads() != THREADS:
        raise RuntimeError(f"TRL runs with {torch.get_num_threads()} torch threads, expected {THREADS}")
    trainer.train()
    c = callback
    return {"curve": c.curve, "eval_steps": c.eval_steps, "eval_s": c.eval_s, "steps": len(c.step_s),
            "elapsed_s": round(c.elapsed_s, 1), "step_s": c.step_s, "reward": c.reward,
            "wall_s_incl_startup": round(time.perf_counter() - wall, 1),
            "config": json.loads(json.dumps(config.to_dict(), default=str))}


# ------------------------------------------------------------------------------------------------ report
def describe(name: str, r: dict) -> dict:
    """Print one system's curve and figures; return the headline numbers."""
    step_s = r["step_s"][2:] if len(r["step_s"]) > 4 else r["step_s"]    # the first steps warm up lazily
    head = {"steps": r["steps"], "elapsed_s": r["elapsed_s"], "median_step_s": round(statistics.median(step_s), 3),
            "median_eval_s": round(statistics.median(r["eval_s"]), 2) if r["eval_s"] else None,
            "initial_accuracy": r["curve"][0][1], "final_accuracy": r["curve"][-1][1],
            "best_accuracy": max(a for _, a in r["curve"]), "wall_s_incl_startup": r["wall_s_incl_startup"]}
    print(f"\n== {name}: held-out exact match against training seconds (steps + evals, start-up excluded)")
    print(f"  {'seconds':>8}  {'step':>5}  {'accuracy':>8}")
    for (s, a), step in zip(r["curve"], r["eval_steps"]):
        print(f"  {s:8.1f}  {step:5d}  {100 * a:7.1f}%")
    print(f"  {head['steps']} steps in {head['elapsed_s']:.0f} s, {head['median_step_s']:.2f} s/step (median), "
          f"{head['median_eval_s']} s/eval (median), "
          f"final {100 * head['final_accuracy']:.1f}%, best {100 * head['best_accuracy']:.1f}%, "
          f"wall incl. start-up {head['wall_s_incl_startup']:.0f} s")
    return head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm", default="runs/demo/warm", help="warm-start model folder (from `rlpipe warmstart`)")
    p.add_argument("--data", default="runs/demo/data", help="folder with train.parquet and eval.parquet")
    p.add_argument("--minutes", type=float, default=10, help="training wall-clock budget per system")
    p.add_argument("--prompts-per-step", type=int, default=64, help="B: prompts per step")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=6, help="T: completion length cap (also for eval)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (constant)")
    p.add_argument("--eval-size", type=int, default=500, help="held-out prompts (first N rows of eval.parquet)")
    p.add_argument("--eval-every-s", type=float, default=30, help="evaluate about every this many seconds")
    p.add_argument("--only", choices=SYSTEMS, help="run one system; the other's results in --out are kept")
    p.add_argument("--out", default="runs/bench_trl", help="output folder: results.json, curves.png, runs")
    args = p.parse_args()

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "out")}
    results: dict = {}
    if args.only and os.path.exists(json_path):      # keep the other system's run if the settings match
        with open(json_path) as fh:
            old = json.load(fh)
        if old.get("settings") == settings:
            results = {n: r for n, r in old["systems"].items() if n != args.only}
        else:
            print(f"{json_path} was made with other settings; its results are replaced")
    for name in ([args.only] if args.only else SYSTEMS):
        print(f"\n######## {name}: {args.minutes:g} min from {args.warm}", flush=True)
        results[name] = run_trl(args) if name == "trl" else run_rlpipe(args)

    heads = {name: describe(name, results[name]) for name in SYSTEMS if name in results}
    if len(heads) == 2:
        print(f"\n== side by side (B={args.prompts_per_step} x G={args.samples_per_prompt}, T={args.max_new_tokens}, "
              f"lr {args.lr:g}, {args.minutes:g} min, {args.eval_size} eval prompts, {os.cpu_count()} CPUs)")
        print(f"  {'':8} {'steps':>6} {'s/step':>7} {'s/eval':>7} {'initial':>8} {'final':>7} {'best':>7}")
        for name, h in heads.items():
            print(f"  {name:8} {h['steps']:6d} {h['median_step_s']:7.2f} {h['median_eval_s'] or 0:7.2f} "
                  f"{100 * h['initial_accuracy']:7.1f}% "
                  f"{100 * h['final_accuracy']:6.1f}% {100 * h['best_accuracy']:6.1f}%")
        gap = 100 * (heads["rlpipe"]["final_accuracy"] - heads["trl"]["final_accuracy"])
        noise = 100 * 1.96 * (0.25 / args.eval_size) ** 0.5           # binomial 95% half-width at p = 0.5
        verdict = "at least as accurate as" if gap >= 0 else "LESS accurate than"
        print(f"  rlpipe ends {verdict} TRL: {gap:+.1f} points (the 95% interval of one {args.eval_size}-prompt "
              f"eval is up to +-{noise:.1f} points)")
        results_summary = {"final_gap_points": round(gap, 1), "rlpipe_at_least_as_accurate": gap >= 0}
    else:
        results_summary = {}
    from pipeline.plots import plot_comparison

    png = plot_comparison({f"{n} ({h['median_step_s']:.2f} s/step)": [(s, 100 * a) for s, a in results[n]["curve"]]
                           for n, h in heads.items()}, os.path.join(args.out, "curves.png"),
                          xlabel="training seconds (steps + evals)", ylabel="held-out exact match (%)",
                          title=f"GRPO from {os.path.join(*os.path.normpath(args.warm).split(os.sep)[-2:])}: rlpipe vs TRL")
    with open(json_path, "w") as fh:
        json.dump({"settings": settings, "time_accounting": "training steps + held-out evals after start-up; "
                   "start-up, the step-0 eval, logging and saving excluded (both systems)",
                   "summary": {n: h for n, h in heads.items()} | results_summary, "systems": results}, fh, indent=1)
    print(f"\nwrote {json_path} and {png}")


if __name__ == "__main__":
    main()
