"""Rollout backends side by side: transformers `generate` (hf) vs vLLM's engine (vllm), same model, same
prompts, same threads, alternating runs in one process; samples/s and completion tokens/s.

Through the real `RolloutGenerator` (prompt formatting, log-probs, masks), so the figures are what a
generator actor gets. Models (random weights: speed does not depend on them, but completion length does, so
sampling runs to the cap on both backends alike):
  demo  the demo's 0.8 M Llama (character tokenizer), its 3-digit prompts, 8 samples x 5 tokens;
  25m   a 25 M Llama (hidden 512, 8 layers, BPE), 64-token prompts, 128-token completions;
  gpu   where CUDA is visible: a Qwen2-0.5B-shaped model in bfloat16, 256 prompts x 64 -> 256 tokens
        (hf alone when vLLM is not installed: it says so).

    python benchmarks/rollout_backends.py [--models demo,25m] [--repeats 3] [--threads 2]
Needs the vLLM extra for the vllm rows (README, Generation backends).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Case:
    name: str
    path: str
    prompts: list
    samples_per_prompt: int
    max_new_tokens: int
    dtype: str = "float32"


def demo_case(root: str) -> Case:
    from pipeline.demo.task import make_arithmetic_task
    from pipeline.small_models import build_tiny_model
    import pyarrow.parquet as pq

    data = make_arithmetic_task(os.path.join(root, "demo-data"), digits=3, n_labelled=100, n_rl=400, n_eval=10, seed=0)
    prompts = pq.read_table(data["train"]).column("prompt").to_pylist()[:32]
    return Case("demo 0.8M, 32 prompts x 8 x 5 tokens", build_tiny_model(os.path.join(root, "demo")), prompts, 8, 5)


def windows(tokenizer, texts: list[str], n: int, length: int) -> list[str]:
    """`n` prompts of about `length` tokens cut from the corpus (decoded, as a dataset would hold them)."""
    ids = [t for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in row]
    return [tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(n)]


def llama_25m_case(root: str) -> Case:
    from transformers import AutoTokenizer

    from pipeline.small_models import build_bpe_model, default_corpus

    path = build_bpe_model(os.path.join(root, "25m"), arch="llama", hidden_size=512, num_layers=8, num_heads=8,
                           intermediate_size=1376, max_positions=256, dropout=0.0, vocab_size=2048)
    prompts = windows(AutoTokenizer.from_pretrained(path), default_corpus(0, 4000), 16, 64)
    return Case("25M Llama, 16 prompts x 8 x 128 tokens", path, prompts, 8, 128)


def gpu_case(root: str) -> Case:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from pipeline.small_models import build_bpe_tokenizer, default_corpus

    tokenizer = build_bpe_tokenizer(default_corpus(0), 4096)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, torch_dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    path = os.path.join(root, "qwen2-0.5b-shaped")
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = windows(AutoTokenizer.from_pretrained(path), default_corpus(0, 8000), 256, 64)
    return Case("Qwen2-0.5B-shaped bf16, 256 prompts x 1 x 256 tokens", path, prompts, 1, 256, "bfloat16")


def make_generator(case: Case, backend: str, threads: int):
    from pipeline.config import load_config
    from pipeline.rollout.generator import RolloutGenerator

    cfg = load_config(None, [f"model.path={case.path}", f"model.dtype={case.dtype}", f"rollout.backend={backend}",
                             f"rollout.max_new_tokens={case.max_new_tokens}"])
    return RolloutGenerator(cfg.model, cfg.rollout, threads=threads, engine_cfg=cfg.vllm)


def timed(gen, case: Case, step: int) -> tuple[float, int, int]:
    prompts = [p for p in case.prompts for _ in range(case.samples_per_prompt)]
    idx = list(range(len(prompts)))
    start = time.perf_counter()
    r = gen.generate(prompts, idx, idx, step)
    return time.perf_counter() - start, len(prompts), int(r.completion_mask.sum())


def run_case(case: Case, backends: list[str], repeats: int, threads: int) -> list[dict]:
    gens = {}
    for b in backends:
        start = time.perf_counter()
        gens[b] = make_generator(case, b, threads)
        print(f"  {b}: ready in {time.perf_counter() - start:.1f} s", flush=True)
        timed(gens[b], case, 0)                                   # warm-up (first-call allocations, kernels)
    runs = {b: [] for b in backends}
    for rep in range(repeats):                                    # alternating, so drift hits both alike
        for b in backends:
            runs[b].append(timed(gens[b], case, rep + 1))
            s, n, tok = runs[b][-1]
            print(f"  {b} run {rep + 1}: {s:.2f} s, {n / s:.0f} samples/s, {tok / s:.0f} tokens/s", flush=True)
    rows = []
    for b in backends:
        s = statistics.median(r[0] for r in runs[b])
        n, tok = runs[b][0][1], statistics.median(r[2] for r in runs[b])
        rows.append({"model": case.name, "backend": b, "seconds": s, "samples_per_s": n / s, "tokens_per_s": tok / s,
                     "tokens_per_sample": tok / n})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,25m,gpu", help="comma list of demo, 25m, gpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch/OMP threads of each backend")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import torch

    try:
        import vllm  # noqa: F401
        backends = ["hf", "vllm"]
    except ImportError as err:
        backends = ["hf"]
        print(f"vLLM is not installed ({err}): hf only. Install the extra for this machine (README).")
    builders = {"demo": demo_case, "25m": llama_25m_case, "gpu": gpu_case}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            if name == "gpu" and not torch.cuda.is_available():
                print("gpu: no CUDA device visible, skipped")
                continue
            case = builders[name](root)
            print(f"{case.name}:", flush=True)
            rows += run_case(case, backends, args.repeats, args.threads)
    print("\n| model | backend | samples/s | tokens/s | tokens/sample | vs hf |\n|---|---|---|---|---|---|")
    for r in rows:
        hf = next(x for x in rows if x["model"] == r["model"] and x["backend"] == "hf")
        print(f"| {r['model']} | {r['backend']} | {r['samples_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_sample']:.1f} | {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
