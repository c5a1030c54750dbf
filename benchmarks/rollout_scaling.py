"""Rollout throughput against the number of rollout workers: a scaling table.

For each N in --workers, starts N `actors.shells.RolloutWorker` actors, shards one fixed batch of
B prompts x G samples over them the way `Trainer.generate` does (contiguous prompt ranges from
`split_indices`, each prompt repeated G times), warms up once, then times --repeats full sharded
generates (submit all shards, one `ray.get`, `concat_rollouts`). Reports samples/s, generated tokens/s,
speedup over the first N and parallel efficiency (speedup / N).

    python benchmarks/rollout_scaling.py [--workers 1,2,4] [--repeats 10] [--model DIR] [--data DIR]
        [--cpus-per-worker X] [--threads-per-worker T] [--gpus-per-worker X] [--address ADDR]
        [--out DIR] [overrides...]

What "fair" means here. By default the CPUs Ray has are split N ways (--cpus-per-worker 0): the
hardware stays fixed and only its division changes, so N=1 gets every core as torch intra-op threads
and a speedup shows what sharding adds over one well-threaded worker (strong scaling). A fixed
--cpus-per-worker (e.g. 1.0 on a cluster, where each worker brings its own cores) measures how
throughput grows as hardware is added instead; a local Ray then gets enough logical CPUs to hold the
largest N, which on a small machine oversubscribes the cores (the table shows both the logical CPU
share and the torch threads, and the total threads against this machine's cores). Torch threads per
worker default to round(CPU share), at least 1, as `resources.torch_threads=0` does in a run.

Model and prompts: --model, else the preset's model.path (runs/demo/warm after `rlpipe warmstart`)
if it exists, else a random demo-sized Llama built in a temp folder; --data (a folder with
train.parquet), else the preset's data.train_path, else a generated 3-digit addition task. B, G and
max_new_tokens come from the preset (--config, default grpo: 32 x 8, 5 tokens) and its overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_resources(n: int, ray_cpus: float, cpus_per_worker: float, threads_per_worker: int) -> tuple[float, int]:
    """(logical CPU share, torch threads) of each of n workers; a share of 0 splits ray_cpus n ways."""
    cpus = cpus_per_worker or ray_cpus / n
    return cpus, threads_per_worker or max(1, round(cpus))


def resolve_inputs(args, cfg, tmp: str) -> tuple[str, str]:
    """(model folder, prompt file): the flags, else the preset's paths if present, else built in tmp."""
    from pipeline.demo.task import make_arithmetic_task
    from pipeline.demo.warmstart import DEMO_DIGITS, DEMO_MODEL
    from pipeline.small_models import build_tiny_model

    model = args.model or (cfg.model.path if os.path.isdir(cfg.model.path) else None)
    if model is None:
        model = build_tiny_model(os.path.join(tmp, "model"), **DEMO_MODEL)
    data = os.path.join(args.data, "train.parquet") if args.data else cfg.data.train_path
    if not os.path.isfile(data):
        data = make_arithmetic_task(os.path.join(tmp, "data"), digits=DEMO_DIGITS, n_labelled=1,
                                    n_rl=max(1000, cfg.rollout.prompts_per_step), n_eval=1)["train"]
    return model, data


def sharded_generate(workers: list, rows: list[dict], G: int, prompt_column: str, step: int):
    """One full generate of B rows x G samples over the workers, as in `Trainer.generate` (without its
    restart handling). Returns the joined Rollout (N = B * G sequences, in sample order)."""
    import ray

    from pipeline.batch import concat_rollouts, split_indices

    calls = []
    for worker, prompt_range in zip(workers, split_indices(len(rows), len(workers))):
        if not prompt_range:
            continue
        prompts = [rows[b][prompt_column] for b in prompt_range for _ in range(G)]   # (n,) each prompt G times
        groups = [b for b in prompt_range for _ in range(G)]
        index = [b * G + g for b in prompt_range for g in range(G)]                  # global sequence position
        calls.append(worker.generate.remote(prompts, groups, index, step))
    return concat_rollouts(ray.get(calls))


def measure(n: int, cfg, rows: list[dict], repeats: int, cpus: float, threads: int, gpus: float) -> dict:
    """Start n workers, warm up once, time `repeats` sharded generates; the workers are killed after."""
    import ray

    from actors.shells import RolloutWorker

    workers = [RolloutWorker.options(num_cpus=cpus, num_gpus=gpus).remote(cfg.model, cfg.rollout,
                                                                         cfg.data.chat_template, i,
                                                                         cfg.train.seed, threads)
               for i in range(n)]
    try:
        ready, _ = ray.wait([w.__ray_ready__.remote() for w in workers], num_returns=n, timeout=300)
        if len(ready) < n:
            raise RuntimeError(f"only {len(ready)} of {n} rollout workers ({cpus:g} CPU, {gpus:g} GPU each) "
                               "started within 300 s: the cluster cannot place them; lower the shares")
        ray.get(ready)                       # a worker whose constructor failed raises here
        G, pc = cfg.rollout.samples_per_prompt, cfg.data.prompt_column
        sharded_generate(workers, rows, G, pc, step=0)       # warm-up: first-call allocations and caches
        times_s, tokens = [], []
        for step in range(1, repeats + 1):                   # a new sampling seed each repeat
            start = time.perf_counter()
            rollout = sharded_generate(workers, rows, G, pc, step)
            times_s.append(time.perf_counter() - start)
            tokens.append(int(rollout.completion_mask.sum()))
    finally:
        for w in workers:
            ray.kill(w)
    median_s = statistics.median(times_s)
    return {"workers": n, "cpus_per_worker": cpus, "threads_per_worker": threads, "gpus_per_worker": gpus,
            "times_s": times_s, "tokens": tokens, "median_s": median_s,
            "samples_per_s": len(rows) * G / median_s,
            "tokens_per_s": statistics.median(k / t for k, t in zip(tokens, times_s))}


def add_speedups(rows: list[dict]) -> None:
    """Speedup over the first row and parallel efficiency = speedup / (workers / first row's workers)."""
    base = rows[0]
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["efficiency"] = r["speedup"] * base["workers"] / r["workers"]


def markdown_table(rows: list[dict], cores: int) -> str:
    lines = ["| workers | CPU share each | torch threads each (total / cores) | time per batch s (median, min-max) "
             "| samples/s | tokens/s | speedup | efficiency |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['cpus_per_worker']:g} | {r['threads_per_worker']} "
                     f"({r['workers'] * r['threads_per_worker']} / {cores}) | {r['median_s']:.3f} "
                     f"({min(r['times_s']):.3f}-{max(r['times_s']):.3f}) | {r['samples_per_s']:,.0f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {100 * r['efficiency']:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    parser.add_argument("--repeats", type=int, default=10, help="timed generates per worker count (default 10)")
    parser.add_argument("--config", default="grpo", help="preset or YAML file for B, G, sampling (default grpo)")
    parser.add_argument("--model", help="model folder (default: the preset's model.path if present, else a "
                        "random demo-sized model)")
    parser.add_argument("--data", help="folder with train.parquet (default: the preset's data.train_path if "
                        "present, else a generated addition task)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.0,
                        help="logical CPUs per worker; 0 = Ray's CPUs split N ways (default)")
    parser.add_argument("--threads-per-worker", type=int, default=0,
                        help="torch intra-op threads per worker; 0 = round(CPU share), at least 1 (default)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPU share per worker (default 0)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--out", help="folder for rollout_scaling.json and rollout_scaling.md")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.prompts_per_step=64")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]

    import ray

    from actors.run import init_ray
    from pipeline.config import load_config
    from pipeline.data.prompt_table import PromptSampler, read_prompt_table

    cores = os.cpu_count()
    # A local Ray gets this machine's cores, or enough logical CPUs for the largest fixed-share layout.
    local_cpus = max(cores, max(counts) * args.cpus_per_worker)
    cfg = load_config(args.config, [f"resources.num_cpus={local_cpus:g}", *args.overrides])
    with tempfile.TemporaryDirectory(prefix="rlpipe-scaling-") as tmp:
        model, data = resolve_inputs(args, cfg, tmp)
        model_label = "a random demo-sized Llama" if model.startswith(tmp) else model
        cfg = replace(cfg, model=replace(cfg.model, path=os.path.abspath(model)))  # actors may run elsewhere
        rows = PromptSampler(read_prompt_table(data, (cfg.data.prompt_column,)),
                             cfg.rollout.prompts_per_step, cfg.data.seed).next_batch()   # (B,) fixed rows
        started = init_ray(cfg.resources.num_cpus, args.address)
        try:
            ray_cpus = ray.cluster_resources().get("CPU", 0.0)
            results = [measure(n, cfg, rows, args.repeats,
                               *worker_resources(n, ray_cpus, args.cpus_per_worker, args.threads_per_worker),
                               args.gpus_per_worker) for n in counts]
        finally:
            if started:
                ray.shutdown()
    add_speedups(results)
    c = cfg.rollout
    header = (f"Rollout scaling: B={c.prompts_per_step} x G={c.samples_per_prompt} = "
              f"{c.prompts_per_step * c.samples_per_prompt} samples, max_new_tokens={c.max_new_tokens}, "
              f"{args.repeats} timed repeats after 1 warm-up; model {model_label}; "
              f"Ray {ray_cpus:g} logical CPUs, this machine {cores} cores")
    table = markdown_table(results, cores)
    print(f"\n{header}\n\n{table}")
    summary = {"header": header, "model": model_label, "data": data, "batch": c.prompts_per_step,
               "samples_per_prompt": c.samples_per_prompt, "max_new_tokens": c.max_new_tokens,
               "repeats": args.repeats, "ray_cpus": ray_cpus, "machine_cores": cores, "rows": results}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rollout_scaling.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(args.out, "rollout_scaling.md"), "w") as f:
            f.write(f"{header}\n\n{table}\n")
    return summary


if __name__ == "__main__":
    main()
