"""Peak memory of one learner process: full fine-tuning, FSDP2 sharding and LoRA, on Llama models of growing
size.

Each (size, mode) runs in a fresh Python process, so one measurement's allocations never inflate the next:
the child builds a randomly initialised Llama of about the asked size, wraps it in the training engine that
every rlpipe trainer uses (`pipeline.trainers.engine.TrainEngine`: float32 master weights, AdamW), takes --steps
optimizer steps on random tokens (--batch sequences of --seq tokens) and reports its peak resident set
(`ru_maxrss`), its trainable parameters and the bytes AdamW's state takes. Full training holds ~16 bytes
per parameter (weights, gradients, two moments); LoRA holds the frozen weights (4 bytes per parameter) and
16 bytes per adapter parameter. Shard runs --shards learner processes (gloo on this CPU) whose engines
shard the model with FSDP2 (`TrainEngine.shard`), each taking its 1/K of the batch, as data-parallel learners
do; the row reports the largest peak of its ranks. Each holds ~16/K bytes per parameter plus one gathered
block at a time; every rank still builds the whole model once before sharding it.

--largest then finds the largest model each mode trains on this machine: a line of memory against
parameters fitted to that mode's rows gives the size whose learners (all of them, on this one machine)
just fit --budget-gib, and a Llama of that size is built and trained to check.

    python benchmarks/learner_memory.py [--sizes 10M,50M,200M] [--modes full,shard,lora] [--shards 2]
        [--lora-rank 16] [--batch 4] [--seq 128] [--steps 2] [--largest [--budget-gib G]] [--out DIR]

Sizes are keys of SHAPES or <hidden>x<layers>. Writes learner_memory.json and learner_memory.md (tables) to
--out (default runs/benchmarks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 8192
SHAPES = {                 # hidden, layers: ~12 * hidden^2 per layer plus untied embeddings and head
    "3M": (128, 4),
    "10M": (256, 8),
    "50M": (512, 12),
    "200M": (1024, 14),
    "500M": (1536, 16),
}


def shape_of(size: str) -> tuple[int, int]:
    """(hidden, layers) of a size: a key of SHAPES, or "<hidden>x<layers>" (e.g. 2048x22)."""
    if size in SHAPES:
        return SHAPES[size]
    hidden, _, layers = size.partition("x")
    if not (hidden.isdigit() and layers.isdigit() and int(hidden) % 64 == 0):
        raise SystemExit(f"--sizes: {size!r} is neither one of {', '.join(SHAPES)} nor <hidden>x<layers> "
                         "with hidden a multiple of 64")
    return int(hidden), int(layers)


def parameters_of(hidden: int, layers: int) -> int:
    """Parameters of llama_config's model: per layer 4 h^2 attention + 3 h (8h/3) MLP (+ 2 norms), untied
    embeddings and head, a final norm."""
    return layers * (4 * hidden * hidden + 3 * hidden * (hidden * 8 // 3) + 2 * hidden) + 2 * VOCAB * hidden + hidden


def shape_for(n: float) -> str:
    """The "<hidden>x<layers>" Llama of at most `n` parameters (wider as it grows: 2048 from 0.4 B, 4096 from 2 B)."""
    hidden = next(h for limit, h in ((2e7, 256), (1e8, 512), (4e8, 1024), (2e9, 2048), (math.inf, 4096)) if n < limit)
    layers = max(1, int((n - parameters_of(hidden, 0)) // (parameters_of(hidden, 1) - parameters_of(hidden, 0))))
    return f"{hidden}x{layers}"


def memory_available_gib() -> float:
    """MemAvailable of /proc/meminfo: what this machine can give new processes now."""
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable")) / 2**20


def used_gib(r: dict) -> float:
    """What a row's model and its training added to the bare interpreter with torch (GiB)."""
    return r["peak_rss_gib"] - r["rss_before_model_gib"]


def largest_fits(rows: list[dict], budget_gib: float) -> dict[str, dict]:
    """Per mode, the parameter count whose learners together just fit `budget_gib` on this machine, from a
    least-squares line of memory above start against parameters over that mode's measured rows (memory
    grows linearly in parameters at a fixed batch): {mode: {"per_param_bytes", "fixed_gib", "start_gib",
    "learners", "parameters"}}."""
    out = {}
    for mode in ("full", "shard", "lora"):
        ok = [r for r in rows if r.get("mode") == mode and "error" not in r]
        if len(ok) < 2:
            continue
        xs = [r["parameters"] for r in ok]
        ys = [used_gib(r) for r in ok]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed, start, learners = my - slope * mx, max(r["rss_before_model_gib"] for r in ok), ok[0].get("ranks", 1)
        out[mode] = {"per_param_bytes": slope * 2**30, "fixed_gib": fixed, "start_gib": start, "learners": learners,
                     "parameters": (budget_gib / learners - start - fixed) / slope}
    return out


def llama_config(size: str):
    """A Llama config of about `size` parameters (a key of SHAPES, or "<hidden>x<layers>")."""
    from transformers import LlamaConfig

    hidden, layers = shape_of(size)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
                       num_key_value_heads=max(4, hidden // 64), max_position_embeddings=512,
                       tie_word_embeddings=False)


def current_rss_gib() -> float:
    """This process's resident set now (Linux /proc; elsewhere its peak so far, an upper bound)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(size: str, mode: str, lora_rank: int, batch: int, seq: int, steps: int, rank: int = 0,
            world: int = 1, port: int = 0) -> dict:
    """In this process (rank `rank` of `world` for shard): build, train `steps` steps, report peak RSS and
    the parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.trainers.engine import TrainEngine

    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    before = current_rss_gib()     # the interpreter with torch and transformers, before the model
    model = AutoModelForCausalLM.from_config(llama_config(size))
    lora = dict(rank=lora_rank, alpha=2.0 * lora_rank, dropout=0.0, target_modules=["all-linear"]) \
        if mode == "lora" else None
    engine = TrainEngine(model, lr=1e-4, lora=lora)
    total = sum(p.numel() for p in engine.model.parameters())
    trainable = sum(p.numel() for p in engine.params)
    if mode == "shard":
        import torch.distributed as dist

        from pipeline.collective import Group

        engine.shard(Group("127.0.0.1", port, rank, world, world=True).mesh("cpu"))   # the parent's store
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.tensor_split(world)[rank]          # a data-parallel rank's share of the batch
    start = time.perf_counter()
    for _ in range(steps):
        out = engine.model(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
    seconds = (time.perf_counter() - start) / steps
    local = [t.to_local() if hasattr(t, "to_local") else t for s in engine.optimizer.state.values()
             for t in s.values() if torch.is_tensor(t)]
    optimizer_bytes = sum(t.numel() * t.element_size() for t in local)
    if mode == "shard":
        dist.destroy_process_group()
    return {"size": size, "mode": mode, "parameters": total, "trainable": trainable,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_before_model_gib": before, "optimizer_gib": optimizer_bytes / 2**30,
            "step_s": seconds, "batch": batch, "seq": seq}


def run_child(size: str, mode: str, args) -> dict:
    """One measurement in fresh processes: one, or --shards ranks for shard (the row keeps the largest peak)."""
    from pipeline.collective import open_store

    world = args.shards if mode == "shard" else 1
    store, _, port = open_store(world, timeout_s=600.0)    # the ranks' rendezvous, held here while they run
    # Allocations of 64 KiB and more are mapped pages that go back to the system when freed, so the peak is
    # what the process held, not what glibc kept cached (its default keeps freed blocks up to 32 MiB in the
    # heap: the whole model a sharded rank built before sharding it would stay counted).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", size, mode,
                               "--lora-rank", str(args.lora_rank), "--batch", str(args.batch), "--seq", str(args.seq),
                               "--steps", str(args.steps), "--rank", str(rank), "--shards", str(world),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
             for rank in range(world)]
    done = [(p, *p.communicate()) for p in procs]
    failed = [err for p, _, err in done if p.returncode != 0]
    if failed:
        return {"size": size, "mode": mode, "error": (failed[0].strip().splitlines() or ["killed"])[-1]}
    del store
    ranks = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in done]
    row = max(ranks, key=lambda r: r["peak_rss_gib"] - r["rss_before_model_gib"])
    return {**row, "ranks": world}


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | learners | parameters | trainable | peak RSS per learner (GiB) | above start (GiB) "
             "| vs full | AdamW state per learner (GiB) | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]

    full = {r["size"]: used_gib(r) for r in rows if r.get("mode") == "full" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | | | | failed: {r['error']} | | | | |")
            continue
        ratio = f"{used_gib(r) / full[r['size']]:.0%}" if full.get(r["size"], 0) > 0 else ""
        lines.append(f"| {r['size']} | {r['mode']} | {r.get('ranks', 1)} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['trainable'] / 1e6:.2f} M | "
                     f"{r['peak_rss_gib']:.2f} | {used_gib(r):.2f} | {ratio} | {r['optimizer_gib']:.3f} | "
                     f"{r['step_s']:.1f} |")
    return "\n".join(lines)


def largest_table(rows: list[dict]) -> str:
    lines = ["| mode | learners on this machine | memory per parameter (fit) | largest by the fit | trained to check "
             "| peak RSS, all learners (GiB) | budget (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["fit"]
        got = (f"failed: {r['error']}" if "error" in r else f"{r['size']} = {r['parameters'] / 1e9:.2f} B, "
               f"{r['step_s']:.0f} s/step")
        lines.append(f"| {r['mode']} | {f['learners']} | {f['per_param_bytes']:.1f} B | {f['parameters'] / 1e9:.2f} B "
                     f"| {got} | {r.get('machine_gib', float('nan')):.1f} | {r['budget_gib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,50M,200M")
    p.add_argument("--modes", default="full,shard,lora")
    p.add_argument("--shards", type=int, default=2, help="learner processes of the shard mode")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--largest", action="store_true",
                   help="then, per mode, fit memory against parameters, predict the largest model whose learners "
                        "fit --budget-gib on this machine and train it to check")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory the largest model may take (default: 85%% of MemAvailable at the start)")
    p.add_argument("--out", default="runs/benchmarks")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        world = args.shards if args.child[1] == "shard" else 1
        print(json.dumps(measure(*args.child, args.lora_rank, args.batch, args.seq, args.steps, args.rank, world,
                                 args.port)))
        return {}
    modes = args.modes.split(",")
    if "shard" in modes and not 2 <= args.shards <= args.batch:
        raise SystemExit(f"--shards: {args.shards}; shard mode needs 2 or more learners, at most --batch ({args.batch})")
    if set(modes) - {"full", "shard", "lora"}:
        raise SystemExit(f"--modes: {args.modes!r}; valid: full, shard, lora")
    for size in args.sizes.split(","):
        shape_of(size)
    rows, largest = [], []
    for size in args.sizes.split(","):
        for mode in modes:
            print(f"{size} {mode} ...", flush=True)
            rows.append(run_child(size, mode, args))
            print("  " + json.dumps(rows[-1]), flush=True)
    if args.largest:
        budget = args.budget_gib or 0.85 * memory_available_gib()
        for mode, fit in largest_fits(rows, budget).items():
            size = shape_for(fit["parameters"])
            print(f"largest {mode}: {fit['parameters'] / 1e9:.2f} B parameters fit {budget:.1f} GiB by the fit; "
                  f"training a {size} Llama to check ...", flush=True)
            row = run_child(size, mode, args)
            if "error" not in row:
                row["machine_gib"] = row.get("ranks", 1) * row["peak_rss_gib"]
            largest.append({**row, "fit": fit, "budget_gib": budget})
            print("  " + json.dumps(largest[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    summary = {"rows": rows, "largest": largest, "lora_rank": args.lora_rank, "batch": args.batch, "seq": args.seq,
               "shards": args.shards}
    with open(os.path.join(args.out, "learner_memory.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    md = table(rows) + ("\n\n" + largest_table(largest) if largest else "")
    with open(os.path.join(args.out, "learner_memory.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    return summary


if __name__ == "__main__":
    main()
