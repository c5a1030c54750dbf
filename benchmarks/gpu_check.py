"""The GPU check: one script for a lent GPU (under 10 minutes on one H200) that measures rlpipe's own parts at
a Qwen2-0.5B shape, each against the machine's own measured limits.

Sections, in order (each writes its figures as soon as it ends, so a run cut short keeps what finished):
  peaks     the machine's limits: a large matrix product in the compute dtype (FLOP/s), a device-to-device
            copy (bytes/s counting read and write);
  rollout   `RolloutGenerator` through hf `generate` (and, in `vllm`, through vLLM): samples/s, tokens/s,
            and tokens/s over the bound of reading the weights once per decode step at the measured bandwidth;
  learner   `PolicyLearner` (GRPO) updates on that rollout in bf16: seconds per update, trained tokens/s
            (the real tokens of the sequences that go forward and backward, per epoch) and MFU, i.e.
            6 x parameters x trained tokens/s over the measured matmul peak;
  shard     the PPO preset (separate critic) in bf16, replicated and then under FSDP2 (`TrainEngine.shard`)
            on a one-GPU NCCL mesh: seconds per update and peak memory of each (one GPU: the sharded code path
            and its cost, not communication between GPUs);
  sync      weight sync seconds per GiB: the object-store path (`export_weights` -> `set_weights`, both
            checksummed) and the broadcast (`send_weights` -> `receive_weights`; NCCL on a GPU, gloo on a CPU)
            from this process to a generator process on the same device (NCCL may refuse two ranks on one GPU:
            the error is recorded);
  vllm      last (vLLM's engine takes the default process group and a share of the GPU): the vllm row of
            the rollout table, then the colocated cycle: vLLM's sleep/wake beside the learner
            (`sleep(level=1)`, `wake_up(["weights"])`, the new weights, `wake_up(["kv_cache"])`): seconds
            of each and the memory given back (needs vLLM).

    python benchmarks/gpu_check.py [--out DIR] [--sections peaks,rollout,...] [--budget-s 540]
    python benchmarks/gpu_check.py --shape cpu [--threads 2]   # this laptop-class CPU's own ratios (25 M)
    python benchmarks/gpu_check.py --shape tiny                # the same code at a toy shape (the test runs it)

Needs torch with CUDA, transformers and pyarrow (the lent H200 image has them); no Ray (the plain classes
behind the actors run in this process) and no MLflow. vLLM is optional: without it the vllm rows and the
colocated cycle say it is missing and the rest runs. Writes DIR/gpu_check.json (every figure) and
DIR/gpu_check.md (the tables); default DIR runs/gpu_check.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("peaks", "rollout", "learner", "shard", "sync", "vllm")


@dataclasses.dataclass
class Shape:
    """The model and batch a run measures."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prompts: int            # rollout prompts, one sample each: also the learner's rows
    prompt_tokens: int
    new_tokens: int
    micro_batch_tokens: int
    matmul: int             # side of the peak's square matrix product
    copy_mib: int           # size of the bandwidth copy


GPU = Shape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936, prompts=256,
             prompt_tokens=64, new_tokens=256, micro_batch_tokens=16384, matmul=8192,
             copy_mib=4096)
CPU = Shape(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=2, vocab=4096, prompts=16, prompt_tokens=64,
            new_tokens=128, micro_batch_tokens=0, matmul=2048, copy_mib=512)
TINY = Shape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=151936, prompts=8, prompt_tokens=16,
             new_tokens=8, micro_batch_tokens=0, matmul=256, copy_mib=16)


SHAPES = {"gpu": GPU, "cpu": CPU, "tiny": TINY}


def missing(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    try:
        __import__(module)
        return None
    except Exception as err:                                     # noqa: BLE001 - any import failure is "missing"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        out.append(time.perf_counter() - start)
    return out


class Check:
    """The shared state of one run: where things are, the machine's limits once measured, the figures."""

    def __init__(self, out: str, shape: Shape, budget_s: float, threads: int):
        import torch

        self.out, self.shape, self.deadline = out, shape, time.monotonic() + budget_s
        self.threads = threads                 # every part and the peak alike: a ratio of like with like
        torch.set_num_threads(threads)
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = "bfloat16" if self.cuda else "float32"
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.path = None
        self.rollout = None
        self.results: dict = {"machine": self.machine(), "shape": dataclasses.asdict(shape), "sections": {}}

    def machine(self) -> dict:
        import torch
        import transformers

        m = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
             "missing": {name: why for name in ("vllm", "ray", "mlflow", "peft") if (why := missing(name))}}
        if torch.cuda.is_available():
            m["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            v = torch.cuda.nccl.version()
            m["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return m

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, section: str, figures: dict) -> None:
        self.results["sections"][section] = figures
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as fh:
            json.dump(self.results, fh, indent=1, default=str)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as fh:
            fh.write(report(self.results))

    def config(self, preset: str, *overrides: str):
        from pipeline.config import load_config

        s = self.shape
        return load_config(preset, [f"model.path={self.model_path()}", f"model.dtype={self.dtype}",
                                    f"model.device={self.device}", "rollout.backend=hf",
                                    f"rollout.max_new_tokens={s.new_tokens}",
                                    f"rollout.prompts_per_step={s.prompts // 4}",
                                    "rollout.samples_per_prompt=4", "algorithm.kl_coef=0", "data.eval_path=null",
                                    f"learner.micro_batch_tokens={s.micro_batch_tokens}",
                                    f"learner.minibatch_size={s.prompts}", *overrides])

    # ------------------------------------------------------------------------------ the model and its prompts
    def model_path(self) -> str:
        """A Qwen2-shaped model with random weights and a BPE tokenizer built here (built once)."""
        if self.path:
            return self.path
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from pipeline.small_models import build_bpe_tokenizer, default_corpus

        s = self.shape
        tokenizer = build_bpe_tokenizer(default_corpus(0), 4096)
        config = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                             num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                             max_position_embeddings=1024, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device(self.device):          # random init on the GPU: seconds, not a minute of CPU
            model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = None   # random weights: sample to the cap, every row alike
        path = os.path.join(self.work, "model")
        model.to(getattr(torch, self.dtype)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.to(getattr(torch, self.dtype)).parameters())
        del model
        self.path = path
        return path

    def prompts(self) -> list[str]:
        from transformers import AutoTokenizer

        from pipeline.small_models import default_corpus

        tok, s = AutoTokenizer.from_pretrained(self.model_path()), self.shape
        ids = [t for row in tok(default_corpus(0, 8000), add_special_tokens=False)["input_ids"] for t in row]
        return [tok.decode(ids[i * s.prompt_tokens:(i + 1) * s.prompt_tokens]) for i in range(s.prompts)]

    def peaks(self) -> dict:
        return self.results["sections"].get("peaks") or self.run_peaks()

    # ------------------------------------------------------------------------------------------ sections
    def run_peaks(self) -> dict:
        import torch

        n, dt = self.shape.matmul, getattr(torch, self.dtype)
        a, b = torch.randn(n, n, device=self.device, dtype=dt), torch.randn(n, n, device=self.device, dtype=dt)
        timed(lambda: a @ b, 3)
        flops = 2 * n ** 3 / statistics.median(timed(lambda: a @ b, 10))
        del a, b
        src = torch.empty(self.shape.copy_mib * 2**20, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        timed(lambda: dst.copy_(src), 2)
        bandwidth = 2 * src.numel() / statistics.median(timed(lambda: dst.copy_(src), 10))
        del src, dst
        return {"matmul_dtype": self.dtype, "matmul_n": n, "matmul_tflops": flops / 1e12,
                "copy_gib": self.shape.copy_mib / 1024, "bandwidth_gbs": bandwidth / 1e9,
                "torch_threads": torch.get_num_threads()}

    def generator_figures(self, backend: str) -> tuple[dict, object]:
        """One backend's `RolloutGenerator` on the prompts: ready seconds, then the median of two timed rollouts
        after a warm-up. -> (figures, the last rollout)."""
        from pipeline.config import load_config
        from pipeline.rollout.generator import RolloutGenerator

        prompts = self.prompts()
        idx = list(range(len(prompts)))
        cfg = load_config(None, [f"model.path={self.model_path()}", f"model.dtype={self.dtype}",
                                 f"model.device={self.device}", f"rollout.backend={backend}",
                                 f"rollout.max_new_tokens={self.shape.new_tokens}", "vllm.gpu_memory_utilization=0.3"])
        start = time.perf_counter()
        gen = RolloutGenerator(cfg.model, cfg.rollout, threads=self.threads, engine_cfg=cfg.vllm)
        ready = time.perf_counter() - start
        runs, rollout = [], None
        for step in range(3):                                    # the first is the warm-up
            synchronize()
            start = time.perf_counter()
            rollout = gen.generate(prompts, groups_of_4(idx), idx, step)
            synchronize()
            runs.append(time.perf_counter() - start)
        del gen
        free_memory()
        seconds, tokens = statistics.median(runs[1:]), int(rollout.completion_mask.sum())
        return {"ready_s": ready, "seconds": seconds, "samples_per_s": len(prompts) / seconds,
                "tokens_per_s": tokens / seconds, "tokens_per_sample": tokens / len(prompts),
                "of_bound": tokens / seconds / self.decode_bound()}, rollout

    def decode_bound(self) -> float:
        """Tokens/s if each decode step (one token for every prompt) cost one read of the weights at the measured
        bandwidth: the bound a memory-bound decoder approaches (the KV cache's reads not counted)."""
        self.model_path()
        return self.shape.prompts * self.peaks()["bandwidth_gbs"] * 1e9 / self.weight_bytes

    def run_rollout(self) -> dict:
        self.model_path()
        figures = {"parameters": self.parameters, "weight_gib": self.weight_bytes / 2**30,
                   "bound_tokens_per_s": self.decode_bound()}
        figures["hf"], self.rollout = self.generator_figures("hf")
        return figures

    def learner_rollout(self):
        if self.rollout is None:
            _, self.rollout = self.generator_figures("hf")
        return self.rollout

    def update_seconds(self, learner, repeats: int) -> tuple[list[float], int]:
        """Seconds of `repeats` updates after one warm-up, and the real tokens one epoch trains on. Each update's
        batch is prepared as the driver prepares it (`actors.driver`): pi_old's source, the learner's rollout-time
        pass, the advantages; only the update is timed."""
        import torch

        from pipeline.batch import TrainBatch
        from pipeline.config import pi_old_source

        r = self.learner_rollout()
        scores = torch.rand(len(r.prompts), generator=torch.Generator().manual_seed(1)).round()
        seconds = []
        for _ in range(repeats + 1):
            r.policy_version = learner.version
            batch = TrainBatch(rollout=r, scores=scores, score_failed=torch.zeros(len(scores), dtype=torch.bool))
            batch.pi_old = pi_old_source(learner.cfg, batch.num_sequences)
            forward = learner.rollout_forward(r, old_logprobs=batch.pi_old == "learner")
            batch.values, batch.old_logprobs = forward["values"], forward.get("old_logprobs")
            attach_advantages(learner.cfg, batch)
            synchronize()
            start = time.perf_counter()
            learner.update(batch)
            synchronize()
            seconds.append(time.perf_counter() - start)
        tokens = int(r.prompt_mask.sum() + r.completion_mask.sum())
        return seconds[1:], tokens

    def run_learner(self) -> dict:
        import torch

        from pipeline.trainers.ppo import PolicyLearner

        cfg = self.config("grpo")
        learner = PolicyLearner(cfg, threads=self.threads)
        reset_peak()
        seconds, tokens = self.update_seconds(learner, 3)
        s = statistics.median(seconds)
        tokens_per_s = tokens * cfg.learner.epochs / s
        achieved = 6 * self.parameters * tokens_per_s
        del learner
        free_memory()
        return {"preset": "grpo", "rows": self.shape.prompts, "epochs": cfg.learner.epochs,
                "micro_batch_tokens": cfg.learner.micro_batch_tokens, "seconds_per_update": s,
                "trained_tokens_per_s": tokens_per_s, "achieved_tflops": achieved / 1e12,
                "mfu_of_measured_peak": achieved / (self.peaks()["matmul_tflops"] * 1e12),
                "peak_memory_gib": peak_memory_gib(), "torch_threads": torch.get_num_threads()}

    def run_shard(self) -> dict:
        from pipeline.collective import DP_GROUP
        from pipeline.trainers.ppo import PolicyLearner

        figures = {"preset": "ppo (separate critic, GAE)", "rows": self.shape.prompts}
        for layout in ("replicated", "sharded"):
            cfg = self.config("ppo", "model.critic=separate")
            learner = PolicyLearner(cfg, threads=self.threads)
            if layout == "sharded":             # FSDP2 over a one-rank mesh: the sharded learners' own code path
                host, port = learner.open_store(DP_GROUP, 1)
                learner.join_group(DP_GROUP, host, port, 0, 1, "nccl" if self.cuda else "gloo", world=True)
                mesh = learner.group(DP_GROUP).mesh(self.device)
                for engine in (learner.policy, learner.critic):
                    engine.shard(mesh)
            reset_peak()
            seconds, tokens = self.update_seconds(learner, 2)
            figures[layout] = {"seconds_per_update": statistics.median(seconds), "peak_memory_gib": peak_memory_gib(),
                               "policy_and_critic_parameters": sum(h[1] for h in learner.held_parameters().values())}
            learner.leave_group(DP_GROUP)
            del learner
            free_memory()
        return figures

    def run_sync(self) -> dict:
        import torch

        from pipeline.collective import Group, open_store, send_weights, weights_spec
        from pipeline.config import load_config
        from pipeline.rollout.generator import RolloutGenerator
        from pipeline.trainers.ppo import PolicyLearner
        from pipeline.weights import state_checksum

        cfg = self.config("grpo")
        learner = PolicyLearner(cfg, threads=self.threads)
        gen = RolloutGenerator(cfg.model, load_config(None, ["rollout.backend=hf"]).rollout, threads=self.threads)
        state = learner.policy.export_state(cfg.model.dtype)
        gib = sum(t.numel() * t.element_size() for t in state.values()) / 2**30

        def object_store():
            gen.set_weights(learner.export_weights())

        object_store()
        os_seconds = statistics.median(timed(object_store, 3))
        checksum_s = statistics.median(timed(lambda: state_checksum(state), 3))
        figures = {"gib": gib, "object_store_s_per_gib": os_seconds / gib, "checksum_s_per_gib": checksum_s / gib}
        # The broadcast: NCCL between GPU processes (gloo on a CPU), to a generator's side in a process of its own.
        backend = "nccl" if self.cuda else "gloo"
        figures["broadcast_backend"] = backend
        store, host, port = open_store(2, 60)
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, host, str(port), json.dumps(weights_spec(state)),
                                     "4", backend, self.device], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        try:
            group = Group(host, port, 0, 2, backend, 60, store)
            checksum = state_checksum(state)
            times = []
            for version in range(4):
                synchronize()
                start = time.perf_counter()
                send_weights(group, state, version, checksum)
                synchronize()
                times.append(time.perf_counter() - start)
            log, _ = receiver.communicate(timeout=60)
            got = json.loads(log.strip().splitlines()[-1])
            figures.update(broadcast_s_per_gib=statistics.median(times[1:]) / gib,
                           broadcast_receiver_s_per_gib=statistics.median(got["seconds"][1:]) / gib,
                           broadcast_intact=got["intact"])
        except Exception as err:                    # noqa: BLE001 - recorded (NCCL may refuse two ranks on one GPU)
            receiver.kill()
            log = receiver.communicate()[0]
            figures["broadcast"] = f"failed: {type(err).__name__}: {err}; receiver: {log.strip()[-600:]}"
        del learner, gen, state
        free_memory()
        return figures

    def run_vllm(self) -> dict:
        """Last, because vLLM's engine takes the process's default process group and a share of the GPU: the
        vllm rollout row (as `rollout`'s hf row), then the colocated sleep/wake cycle."""
        if missing("vllm"):
            return {"status": f"skipped: vLLM missing ({missing('vllm')}); on the lent machine its CUDA wheel "
                              "(hundreds of MB) does not fit the 64 MiB that travels"}
        figures = {"rollout": self.generator_figures("vllm")[0]}
        if not self.cuda:
            figures["colocate"] = "skipped: vLLM's sleep mode needs CUDA"
            return figures
        import torch
        from vllm import LLM, SamplingParams

        from pipeline.trainers.ppo import PolicyLearner

        llm = LLM(model=self.model_path(), dtype=self.dtype, enable_sleep_mode=True, gpu_memory_utilization=0.3,
                  seed=0)
        params = SamplingParams(max_tokens=self.shape.new_tokens, ignore_eos=True)
        learner = PolicyLearner(self.config("grpo"), threads=self.threads)
        state = list(learner.policy.export_state(self.dtype).items())
        prompts, cycle = self.prompts(), {}

        def phase(name, fn):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            cycle[f"{name}_s"] = time.perf_counter() - start
            cycle[f"{name}_free_gib"] = torch.cuda.mem_get_info()[0] / 2**30

        phase("generate", lambda: llm.generate(prompts, params, use_tqdm=False))
        phase("sleep", lambda: llm.sleep(level=1))
        phase("wake_weights", lambda: llm.wake_up(tags=["weights"]))
        phase("load_weights", lambda: llm.collective_rpc("reload_weights", kwargs={"weights_iterator": state}))
        phase("wake_kv_cache", lambda: llm.wake_up(tags=["kv_cache"]))
        phase("generate_again", lambda: llm.generate(prompts, params, use_tqdm=False))
        figures["colocate"] = cycle
        return figures


# The generator's side of the broadcast, in a process of its own (argv: host, port, spec, repeats, backend, device).
RECEIVER = textwrap.dedent("""
    import json, sys, time, torch
    from pipeline.collective import Group, receive_weights
    host, port, spec, repeats, backend, device = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5], sys.argv[6]
    spec = [(n, tuple(s), d) for n, s, d in spec]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    group = Group(host, port, 1, 2, backend, 60)
    seconds, versions = [], []
    for _ in range(repeats):
        sync(); start = time.perf_counter()
        version, checksum, state = receive_weights(group, spec, device)
        sync(); seconds.append(time.perf_counter() - start); versions.append(version)
    from pipeline.weights import state_checksum
    print(json.dumps({"seconds": seconds, "intact": versions == list(range(repeats))
                      and state_checksum(state) == checksum}))
""")


def attach_advantages(cfg, batch) -> None:
    """The driver's advantage stage for one batch (each score the sequence reward, on its last token)."""
    from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward

    r, a = batch.rollout, cfg.algorithm
    batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
        token_rewards=place_sequence_reward(batch.scores, r.train_mask), mask=r.train_mask, group_ids=r.group_ids,
        values=batch.values, gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std))


def groups_of_4(idx: list[int]) -> list[int]:
    """Group ids in fours, so GRPO's group baseline has something to compare (the prompts differ: timing only)."""
    return [i // 4 for i in idx]


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def report(results: dict) -> str:
    """The figures as markdown tables (what the benchmarks page quotes)."""
    m, sec = results["machine"], results["sections"]
    lines = [f"GPU check on {m['device']} (torch {m['torch']}, transformers {m['transformers']}); missing: "
             + (", ".join(sorted(m["missing"])) or "nothing"), ""]
    p = sec.get("peaks")
    if isinstance(p, dict) and "matmul_tflops" in p:
        lines += [f"Peaks: {p['matmul_dtype']} {p['matmul_n']}^3 matrix product {p['matmul_tflops']:.3g} TFLOP/s; "
                  f"device copy {p['bandwidth_gbs']:.0f} GB/s (read + write)", ""]
    r, v = sec.get("rollout"), sec.get("vllm") or {}
    if isinstance(r, dict) and "hf" in r:
        lines += [f"Rollout ({r['parameters'] / 1e6:.0f} M parameters, {r['weight_gib']:.2f} GiB of weights; bound "
                  f"{r['bound_tokens_per_s']:,.0f} tokens/s = prompts x bandwidth / weight bytes):", "",
                  "| backend | ready s | s per rollout | samples/s | tokens/s | of bound |",
                  "|---|---|---|---|---|---|"]
        for b, x in (("hf", r["hf"]), ("vllm", v.get("rollout") or v.get("status") or v.get("error"))):
            if isinstance(x, dict):
                lines.append(f"| {b} | {x['ready_s']:.1f} | {x['seconds']:.2f} | {x['samples_per_s']:,.1f} | "
                             f"{x['tokens_per_s']:,.0f} | {x['of_bound']:.2%} |")
            elif x:
                lines.append(f"| {b} | {x} | | | | |")
        lines.append("")
    lr = sec.get("learner")
    if isinstance(lr, dict) and "seconds_per_update" in lr:
        lines += [f"Learner ({lr['preset']}, {lr['rows']} rows, micro-batches of {lr['micro_batch_tokens']} tokens): "
                  f"{lr['seconds_per_update']:.2f} s per update, {lr['trained_tokens_per_s']:,.0f} trained tokens/s, "
                  f"{lr['achieved_tflops']:.3g} TFLOP/s = MFU {lr['mfu_of_measured_peak']:.1%} of the measured peak"
                  + (f", peak memory {lr['peak_memory_gib']:.1f} GiB" if lr.get("peak_memory_gib") else ""), ""]
    s = sec.get("shard")
    if isinstance(s, dict) and "sharded" in s:
        lines += [f"PPO step with a separate critic ({s['rows']} rows):", "", "| layout | s per update | peak GiB |",
                  "|---|---|---|"]
        for layout in ("replicated", "sharded"):
            x = s[layout]
            mem = f"{x['peak_memory_gib']:.1f}" if x.get("peak_memory_gib") is not None else "-"
            lines.append(f"| {layout} | {x['seconds_per_update']:.2f} | {mem} |")
        lines.append("")
    y = sec.get("sync")
    if isinstance(y, dict) and "gib" in y:
        nccl = (f"{y['broadcast_backend']} broadcast {y['broadcast_s_per_gib']:.3f} s/GiB (receiver "
                f"{y['broadcast_receiver_s_per_gib']:.3f}, intact: {y['broadcast_intact']})"
                if "broadcast_s_per_gib" in y else f"{y['broadcast_backend']} broadcast {y.get('broadcast')}")
        lines += [f"Weight sync of {y['gib']:.2f} GiB: object store {y['object_store_s_per_gib']:.2f} s/GiB "
                  f"(checksum alone {y['checksum_s_per_gib']:.2f}); {nccl}", ""]
    c = v.get("colocate") if isinstance(v, dict) else None
    if c:
        lines += ["Colocated cycle: " + (c if isinstance(c, str) else ", ".join(f"{k} {x:.2f}" for k, x in c.items())),
                  ""]
    for name, x in sec.items():
        if isinstance(x, dict) and "error" in x:
            lines += [f"{name}: failed: {x['error']}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "gpu_check"))
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--budget-s", type=float, default=540, help="no section starts after this many seconds")
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpu",
                   help="gpu: Qwen2-0.5B, 256 prompts x 64 -> 256 tokens; cpu: a 25 M Qwen2, 16 x 64 -> 128; "
                        "tiny: a toy")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every part (0: one per core)")
    args = p.parse_args(argv)
    wanted = args.sections.split(",")
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}")
    check = Check(args.out, SHAPES[args.shape], args.budget_s, args.threads or os.cpu_count() or 1)
    print(f"machine: {json.dumps(check.results['machine'])}", flush=True)
    for name in SECTIONS:
        if name not in wanted:
            continue
        if check.time_left() <= 0:
            check.record(name, {"error": f"not run: the {args.budget_s:.0f} s budget was spent"})
            continue
        start = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            figures = getattr(check, f"run_{name}")()
        except Exception as err:                              # noqa: BLE001 - one section's failure is recorded
            traceback.print_exc()
            figures = {"error": f"{type(err).__name__}: {err}"}
            free_memory()
        figures["section_s"] = time.perf_counter() - start
        check.record(name, figures)
        print(f"[{name}] {time.perf_counter() - start:.1f} s: {json.dumps(figures, default=str)}", flush=True)
    print(report(check.results))
    return check.results


if __name__ == "__main__":
    main()
